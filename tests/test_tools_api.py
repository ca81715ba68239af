"""OpenAI's tools API on our server, through the official openai client: tool_calls streamed and
not (the same calls), tool_choice none / auto / required / named (a forced call's arguments are
valid JSON for the schema, tools.CallConstraint), tool results sent back, bad tools -> 400; the chat
page runs the calculator on the server (GET /tools, POST /tools/calculator) and shows call and result."""

import json
import re
import threading

import pytest

import openai_api
import tokenizer
import tools
from test_openai_api import StubCompletion, StubEngine, raw, start
from test_serve import random_model, wait_until

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


# ---------------------------------------------------------------------------------------
# The chat page's calculator: the server runs it (tools.calculate), the page shows it


class ScriptedEngine(StubEngine):
    """A model that calls tools, scripted: asked "what is X?" it calls the calculator on X; shown
    a tool result, it answers with it. Replies stream in a few pieces; every prompt is kept."""
    block_size = 512

    def complete(self, tok, prompt, stop_ids, stop, **sampling):
        text = tok.decode(prompt)
        self.calls.append(text)
        turn = text.rsplit("<|user|>", 1)[-1]  # the last question and what followed it
        result = re.findall(r"<\|tool_result\|>(.*?)<\|end\|>", turn)
        if result:
            reply = "The answer is " + result[-1]
        else:
            expression = re.findall(r"what is (.*?)\?", turn)[-1]
            reply = "<|tool_call|>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        return StubCompletion([reply[i:i + 9] for i in range(0, len(reply), 9)])


def scripted_server(spec="chat:tools:char:" + ALPHABET, **kw):
    tok = tokenizer.load_tokenizer(spec)
    srv = openai_api.make_server(ScriptedEngine(), tok, template=tokenizer.ChatTemplate(tok), log_requests=False, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("body, says", [
    ({"expression": "__import__('os')"}, "calculator: Call is not allowed"),
    ({"expression": "().__class__"}, "calculator: Attribute is not allowed"),
    ({"expression": "9 ** 99999"}, "calculator: exponent 99999 is larger"),
    ({"expr": "1 + 1"}, "the calculator takes"),
    ({"expression": 12}, "the calculator takes"),
    (b"[1]", "the body must be a JSON object"),
    (b'{"expression": ', "the body is not valid JSON"),
])
def test_calculator_endpoint_refuses_with_one_line(loopback, body, says):
    srv = scripted_server()
    try:
        status, _, reply = raw(srv, "POST", "/tools/calculator", body)
        assert status == 400 and reply["error"]["message"].startswith(says) and "\n" not in reply["error"]["message"]
    finally:
        srv.close()


def test_calculator_endpoint_and_tool_list(loopback):
    srv = scripted_server(api_key="k")
    auth = {"Authorization": "Bearer k"}
    try:
        assert raw(srv, "GET", "/tools", headers=auth)[2] == {"tools": [tools.CALCULATOR_TOOL]}
        for expression, value in (("3487 * 291", 3487 * 291), ("(2 + 3) ** 2 // 4", (2 + 3) ** 2 // 4), ("1 / 8", 1 / 8)):
            status, _, reply = raw(srv, "POST", "/tools/calculator", {"expression": expression}, auth)
            assert status == 200 and reply == {"name": "calculator", "content": str(value)}
        assert raw(srv, "POST", "/tools/calculator", {"expression": "1"})[0] == 401  # the API key guards it too
    finally:
        srv.close()
    srv = scripted_server("chat:char:" + ALPHABET)  # a chat model without the tool tokens: nothing offered
    try:
        assert raw(srv, "GET", "/tools")[2] == {"tools": []}
    finally:
        srv.close()


def test_browser_chat_page_runs_the_calculator(loopback, browser):
    """The page sends the calculator with the request, the scripted model calls it, the page has
    the server run it and shows the call and its result, sends the result back and shows the answer;
    a refused expression shows the server's line, which goes back to the model too."""
    from selenium.webdriver.common.by import By

    srv = scripted_server()
    try:
        browser.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        assert wait_until(lambda: "tools: calculator" in browser.find_element(By.ID, "model").text)
        for question, result in (("what is 3487 * 291?", str(3487 * 291)),
                                 ("what is 2 ** 99999?", "error: calculator: exponent 99999 is larger than")):
            n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.tool"))
            browser.find_element(By.ID, "input").send_keys(question)
            browser.find_element(By.ID, "send").click()
            assert wait_until(lambda: browser.find_element(By.ID, "status").text == "" and
                              len(browser.find_elements(By.CSS_SELECTOR, ".msg.tool")) == n + 1, timeout=15)
            tool = browser.find_elements(By.CSS_SELECTOR, ".msg.tool")[-1]
            shown = tool.find_element(By.CLASS_NAME, "result").get_property("textContent")
            assert tool.find_element(By.CLASS_NAME, "call").get_property("textContent") == f"calculator({question[8:-1]})"
            assert shown.startswith(result) and tool.get_attribute("data-tool") == "calculator"
            final = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            assert final.get_attribute("data-done") == "true" and final.get_property("textContent") == "The answer is " + shown
            assert f"<|tool_result|>{shown}<|end|>" in srv.engine.calls[-1]  # the page sent the result back
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        srv.close()
