"""OpenAI's tools API on our server, through the official openai client: tool_calls streamed and
not (the same calls), tool_choice none / auto / required / named (a forced call's arguments are
valid JSON for the schema, tools.CallConstraint), tool results sent back, bad tools -> 400."""

import json

import pytest

import tokenizer
import tools
from test_openai_api import start
from test_serve import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ALPHABET = "".join(map(chr, range(32, 127))) + "\n"
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TOOLS = [tools.CALCULATOR_TOOL, WEATHER]
USER = [{"role": "user", "content": "What is 12 * 34?"}]


@pytest.fixture(scope="module")
def chat_server(loopback):
    """A random model behind nanollm's own chat template with the tool tokens (chat:tools:)."""
    tok = tokenizer.load_tokenizer("chat:tools:char:" + ALPHABET)
    srv = start(random_model(tok.vocab_size, seed=3), tok, max_num_seqs=4, template=tokenizer.ChatTemplate(tok))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(chat_server):
    openai = pytest.importorskip("openai", reason="the official openai client (pip install openai) is the reference")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{chat_server.server_address[1]}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def accumulate(stream):
    """The reply of a stream as the openai client's users accumulate it."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_forced_calls_are_valid_and_a_stream_gives_the_same(client, choice):
    reply = client.chat.completions.create(model="nanollm", messages=USER, tools=TOOLS, tool_choice=choice,
                                           max_tokens=100, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "weather" and set(arguments) == {"city", "unit"}
        assert len(arguments["city"]) <= 10 and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert call.function.name in ("calculator", "weather")
    content, calls, finish = accumulate(client.chat.completions.create(
        model="nanollm", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=100, temperature=0, stream=True))
    assert finish == "tool_calls" and content == (message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(call.function.name, arguments)]
    assert calls[0]["id"].startswith("call_")


def test_sampled_forced_calls_are_schema_valid(client):
    for seed in range(5):
        reply = client.chat.completions.create(model="nanollm", messages=USER, tools=[WEATHER], tool_choice="required",
                                               max_tokens=100, temperature=1.0, seed=seed)
        arguments = json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")


def test_auto_and_none_answer_text_from_a_model_that_does_not_call(client):
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model="nanollm", messages=USER, tools=TOOLS, tool_choice=choice,
                                               max_tokens=20, temperature=0)
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_tool_results_go_back_into_the_conversation(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_1", "content": tools.calculator_text("12*34")}]
    reply = client.chat.completions.create(model="nanollm", messages=messages, tools=TOOLS, max_tokens=10, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kwargs, says", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "letters, digits"),
    (dict(tools=[{"type": "retrieval"}]), r"tools\[0\] must be"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not in 'tools'"),
    (dict(tool_choice="required"), "needs 'tools'"),
    (dict(messages=[{"role": "tool", "tool_call_id": "x", "content": "1"}]), "tool_call_id"),
])
def test_bad_tool_requests_get_400(client, kwargs, says):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match=says):
        client.chat.completions.create(model="nanollm", **{"messages": USER, "max_tokens": 5, **kwargs})
