"""tools.py: the safe calculator, the tool-call parsers of each family, and streaming that adds up
to the whole reply's answer."""

import json
import random

import pytest

import tools
from common import NanoError


@pytest.mark.parametrize("expression, value", [
    ("3487 * 29", 3487 * 29), ("2**10 + 3", 1027), ("-(7 - 10) // 2", 1), ("7 / 2", 3.5),
    ("1e3 * 2", 2000.0), ("17 % 5", 2), ("2 ** -1", 0.5), ("((1))", 1),
])
def test_calculator_computes_arithmetic(expression, value):
    assert tools.calculate(expression) == value


@pytest.mark.parametrize("expression, says", [
    ("__import__('os').system('true')", "Call is not allowed"),
    ("().__class__", "Attribute is not allowed"), ("x + 1", "Name is not allowed"),
    ("10 ** 100000", "exponent 100000"), ("9 ** 999", "more than 100 digits"),
    ("2 ** 1000 ** 1000", "more than 100 digits"), ("1 / 0", "division by zero"),
    ("10.0 ** 400", "too large"), ("1e308 * 10", "more than 100 digits"), ("(-8) ** 0.5", "not a real number"),
    ("True + 1", "Constant is not allowed"), ("[1, 2]", "List is not allowed"),
    ("lambda: 1", "Lambda is not allowed"), ("1 +", "not an arithmetic expression"), ("", "empty"),
    ("1+" * 150 + "1", "longer than 200"),
])
def test_calculator_refuses_with_one_line(expression, says):
    with pytest.raises(NanoError, match=says) as e:
        tools.calculate(expression)
    assert "\n" not in str(e.value)


def test_calculator_text_and_cli(capsys):
    assert tools.calculator_text("6 * 7") == "42"
    assert tools.calculator_text("6 / 3") == "2"
    assert tools.calculator_text("a").startswith("error: calculator: Name")
    assert tools.main(["calc", "2 ** 8"]) == 0 and capsys.readouterr().out.strip() == "256"
    assert tools.main(["calc", "open('x')"]) == 2
    assert capsys.readouterr().err.startswith("error: calculator: Call")


def test_run_tool_call_passes_arguments_and_reports_errors():
    call = tools.openai_call("calculator", {"expression": "12 * 12"})
    functions = {"calculator": tools.calculator_text}
    assert tools.run_tool_call(call, functions) == "144"
    assert tools.run_tool_call(tools.openai_call("nope", {}), functions) == "error: no tool named 'nope'"
    bad = {"function": {"name": "calculator", "arguments": "{\"expr\": 1}"}}
    assert tools.run_tool_call(bad, functions).startswith("error:")


ARGS_W = {"city": "Zürich", "unit": "celsius"}
ARGS_T = {"zone": "東京 🗼"}
REPLIES = {  # (format, reply as the family's model writes it, expected content, expected calls)
    "hermes-two": ("hermes", 'Let me check.\n<tool_call>\n' + json.dumps({"name": "weather", "arguments": ARGS_W})
                   + '\n</tool_call>\n<tool_call>\n' + json.dumps({"name": "time", "arguments": ARGS_T},
                                                                   ensure_ascii=False) + "\n</tool_call>",
                   "Let me check.", [("weather", ARGS_W), ("time", ARGS_T)]),
    "hermes-think": ("hermes", "<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>",
                     "<think>\n\n</think>", [("time", {})]),
    "llama3": ("llama3", json.dumps({"name": "weather", "parameters": ARGS_W}), "", [("weather", ARGS_W)]),
    "llama3-tag-two": ("llama3", "<|python_tag|>" + json.dumps({"name": "a", "parameters": {"x": 1}}) + "; "
                       + json.dumps({"name": "b", "parameters": {"y": [1, 2]}}), "", [("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    "mistral-v3": ("mistral", "[TOOL_CALLS] " + json.dumps([{"name": "weather", "arguments": ARGS_W},
                                                            {"name": "time", "arguments": ARGS_T}], ensure_ascii=False),
                   "", [("weather", ARGS_W), ("time", ARGS_T)]),
    "mistral-v11": ("mistral", "[TOOL_CALLS]weather[ARGS]" + json.dumps(ARGS_W) + "[TOOL_CALLS]time[ARGS]{}",
                    "", [("weather", ARGS_W), ("time", {})]),
    "nanollm": ("nanollm", "<|tool_call|>" + json.dumps({"name": "calculator", "arguments": {"expression": "2*3"}}),
                "", [("calculator", {"expression": "2*3"})]),
    "nanollm-two": ("nanollm", "Both: <|tool_call|>" + json.dumps({"name": "weather", "arguments": ARGS_W})
                    + "<|tool_call|>" + json.dumps({"name": "time", "arguments": ARGS_T}, ensure_ascii=False),
                    "Both:", [("weather", ARGS_W), ("time", ARGS_T)]),
    "arguments-as-string": ("hermes", "<tool_call>" + json.dumps({"name": "f", "arguments": json.dumps({"a": 1})})
                            + "</tool_call>", "", [("f", {"a": 1})]),
}
MALFORMED = {  # these stay content, as they are
    "hermes-broken-json": ("hermes", 'Sure <tool_call>{"name": "weather", "arguments": {"city": </tool_call>'),
    "hermes-unclosed": ("hermes", '<tool_call>{"name": "weather", "arguments": {}}'),
    "hermes-no-name": ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),
    "llama3-text": ("llama3", "The weather is fine {maybe}."),
    "llama3-json-not-call": ("llama3", '{"answer": 42}'),
    "mistral-empty": ("mistral", "[TOOL_CALLS] []"),
    "mistral-args-not-object": ("mistral", "[TOOL_CALLS]f[ARGS][1, 2]"),
    "nanollm-bad": ("nanollm", "<|tool_call|>calculator(2*3)"),
    "plain": ("nanollm", "Just an answer with <|tool_ and braces {}."),
}


def id_ok(call_id, fmt):
    """OpenAI's "call_..." ids; Mistral's templates take back only 9 letters and digits."""
    return call_id.isalnum() and len(call_id) == 9 if fmt == "mistral" else call_id.startswith("call_")


def calls_of(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("case", sorted(REPLIES))
def test_parsers_turn_each_familys_calls_into_openai_tool_calls(case):
    fmt, reply, content, expected = REPLIES[case]
    got_content, calls = tools.parse_tool_calls(reply, tools.FORMATS[fmt])
    assert got_content == content and calls_of(calls) == expected
    assert all(id_ok(c["id"], fmt) and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_calls_stay_content(case):
    fmt, reply = MALFORMED[case]
    assert tools.parse_tool_calls(reply, tools.FORMATS[fmt]) == (reply, [])


def stream(reply, fmt, rng):
    """Feed the reply in random pieces; accumulate deltas the way the openai client does."""
    s, content, calls, i = tools.ToolStream(tools.FORMATS[fmt], argument_chunk=rng.randint(1, 9)), "", {}, 0
    deltas = []
    while i < len(reply):
        n = rng.randint(1, 6)
        piece, more = s.feed(reply[i:i + n])
        content, deltas, i = content + piece, deltas + more, i + n
    piece, more = s.finish()
    for d in deltas + more:
        call = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += d.get("id", "")
        call["name"] += d["function"].get("name", "")
        call["arguments"] += d["function"].get("arguments", "")
    return content + piece, [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("case", sorted(REPLIES) + sorted(MALFORMED))
def test_a_stream_adds_up_to_the_whole_reply(case):
    fmt, reply = (REPLIES[case][:2] if case in REPLIES else MALFORMED[case])
    content, calls = tools.parse_tool_calls(reply, tools.FORMATS[fmt])
    rng = random.Random(case)
    for _ in range(20):
        got_content, got_calls = stream(reply, fmt, rng)
        assert got_content == content
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls_of(calls)
        assert all(id_ok(c["id"], fmt) for c in got_calls)


def test_a_stream_sends_plain_text_as_it_comes():
    s = tools.ToolStream(tools.FORMATS["hermes"])
    assert s.feed("Hello") == ("Hello", [])
    assert s.feed(" world <tool") == (" world", [])  # the marker's beginning and its space are held
    assert s.feed("s are fun") == (" <tools are fun", [])
    assert s.finish() == ("", [])


def test_check_tools_and_tool_choice():
    ok = [tools.CALCULATOR_TOOL]
    assert tools.check_tools(ok) == ok
    for bad, says in [([], "non-empty list"), ([{"type": "function"}], r"tools\[0\] must be"),
                      ([{"type": "function", "function": {"name": "a b"}}], "letters, digits"),
                      ([tools.CALCULATOR_TOOL] * 2, "second tool"),
                      ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "schema object")]:
        with pytest.raises(NanoError, match=says):
            tools.check_tools(bad)
    assert tools.check_tool_choice("auto", ok) == "auto"
    named = {"type": "function", "function": {"name": "calculator"}}
    assert tools.check_tool_choice(named, ok) == named
    with pytest.raises(NanoError, match="not in 'tools'"):
        tools.check_tool_choice({"type": "function", "function": {"name": "x"}}, ok)
    with pytest.raises(NanoError, match="needs 'tools'"):
        tools.check_tool_choice("required", None)
    with pytest.raises(NanoError, match="must be 'auto'"):
        tools.check_tool_choice(3, ok)


def test_format_of_template():
    assert tools.format_of_template("{% for t in tools %}<tool_call>{% endfor %}").name == "hermes"
    assert tools.format_of_template("[TOOL_CALLS]").name == "mistral"
    assert tools.format_of_template("<|start_header_id|>ipython<|end_header_id|>").name == "llama3"
    assert tools.format_of_template(None).name == "nanollm"


SCHEMA_TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "hourly": {"type": "boolean"},
        "points": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "note": {"type": ["string", "null"]}}}},
        "required": ["city"]}}},
    tools.CALCULATOR_TOOL,
]


def valid_for(value, schema):
    """A small JSON-schema check (the subset the constraint compiles), written independently."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        return any(valid_for(value, {**schema, "type": k}) for k in kind)
    checks = {"string": lambda v: isinstance(v, str) and len(v) <= schema.get("maxLength", 10**9),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
              "array": lambda v: isinstance(v, list) and len(v) <= schema.get("maxItems", 10**9)
              and all(valid_for(x, schema["items"]) for x in v),
              "object": lambda v: isinstance(v, dict) and set(schema.get("required", [])) <= set(v)
              and all(k in schema["properties"] and valid_for(x, schema["properties"][k]) for k, x in v.items())}
    return checks[kind](value)


def constrained_samples(tok, n, seed, max_steps=400):
    """n tool calls sampled at temperature 1 from a random tiny GPT, all rows in lockstep."""
    import torch

    import gpt

    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    eos = tok.vocab_size - 1
    grammar = tools.CallGrammar(tok, SCHEMA_TOOLS, {eos})
    constraints = [tools.CallConstraint(grammar) for _ in range(n)]
    idx = torch.zeros(n, 1, dtype=torch.long)
    texts = [[] for _ in range(n)]
    for _ in range(max_steps):
        with torch.no_grad():
            logits = model(idx[:, -8:])[0][:, -1].float()
        for row, c in enumerate(constraints):
            if c.done:
                continue
            masked = logits[row].masked_fill(~c.allowed(), float("-inf"))
            token = torch.multinomial(torch.softmax(masked, -1), 1).item()
            c.advance(token)
            if not c.done:
                texts[row].append(token)
        idx = torch.cat([idx, torch.randint(tok.vocab_size, (n, 1))], 1)
        if all(c.done for c in constraints):
            break
    assert all(c.done for c in constraints), "every call ends within the bounds"
    return [tok.decode(t) for t in texts]


def check_calls(texts):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SCHEMA_TOOLS}
    names = set()
    for text in texts:
        call = json.loads(text)
        assert set(call) == {"name", "arguments"} and valid_for(call["arguments"], schemas[call["name"]]), text
        names.add(call["name"])
    return names


def test_constrained_calls_are_schema_valid_at_temperature_one(one_thread):
    import tokenizer

    tok = tokenizer.load_tokenizer("char:" + "".join(map(chr, range(32, 127))) + "éü東京\x00")
    texts = constrained_samples(tok, 200, seed=0)
    assert check_calls(texts) == {"weather", "calculator"}  # both tools are reachable
    assert any(any(ord(ch) > 127 for ch in t) for t in texts)  # and non-ASCII characters too


@pytest.mark.slow
def test_constrained_calls_with_gpt2_tokens(one_thread):
    import tokenizer

    class WithEos:  # GPT-2's <|endoftext|> is the last id: the stop token
        def __init__(self, tok):
            self.enc, self.vocab_size, self.decode = tok.enc, tok.vocab_size, tok.decode

    texts = constrained_samples(WithEos(tokenizer.load_tokenizer("gpt2")), 50, seed=1)
    check_calls(texts)


def test_constraint_refuses_a_tokenizer_that_cannot_write_json():
    import tokenizer

    c = tools.CallConstraint(tools.CallGrammar(tokenizer.load_tokenizer("char:abc"), [tools.CALCULATOR_TOOL], {0}))
    with pytest.raises(NanoError, match="cannot write JSON"):
        c.allowed()
    with pytest.raises(NanoError, match="does not know the schema"):
        tools.CallGrammar(tokenizer.load_tokenizer("char:abc"), [{"function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "date"}}}}}], {0})


# ----------------------------------------------------------------------------------------
# Request messages -> template messages; nanollm's own tool tokens


def test_normalize_messages_decodes_arguments_and_checks_ids():
    call = {"id": "call_9f8e7d6c5b4a", "type": "function",
            "function": {"name": "calculator", "arguments": "{\"expression\": \"12 * 12\"}"}}
    wire = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "12 * 12?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "144"}]
    got = tools.normalize_messages(wire)
    assert got[0] == {"role": "system", "content": "be brief"}
    assert got[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 12"}}}]}
    assert got[3] == {"role": "tool", "content": "144", "tool_call_id": call["id"]}
    assert wire[2]["tool_calls"][0]["function"]["arguments"].startswith("{")  # the request is not changed
    short = tools.normalize_messages(wire, tools.FORMATS["mistral"])
    assert short[2]["tool_calls"][0]["id"] == short[3]["tool_call_id"] == "8e7d6c5b4a"[-9:]


@pytest.mark.parametrize("bad, says", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "assistant", "content": None}], "content must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "tool_calls must be a non-empty list"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}],
     "arguments must be a JSON object"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}]}],
     "arguments must be a JSON object"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}], r"\.id must be"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}], "name must be"),
    ([{"role": "tool", "content": "1"}], "tool_call_id is required"),
    ([{"role": "tool", "content": "1", "tool_call_id": "nope"}], "answers no earlier"),
])
def test_normalize_messages_refuses_with_one_line(bad, says):
    with pytest.raises(NanoError, match=says) as e:
        tools.normalize_messages(bad)
    assert "\n" not in str(e.value)


def test_nanollm_tool_tokens_render_and_parse_back():
    """"chat:tools:" specs add <|tool_call|> and <|tool_result|> after the four chat tokens; a call is
    part of the answer (loss), a result is given; the reply the model writes parses back to the call.
    "chat:" specs keep 4 tokens and refuse tool messages."""
    import sft
    import tokenizer

    alphabet = "char:" + "".join(sorted(set("abcdefghijklmnopqrstuvwxyz0123456789{}[]\":,* _")))
    old, tok = tokenizer.load_tokenizer("chat:" + alphabet), tokenizer.load_tokenizer("chat:tools:" + alphabet)
    n = len(alphabet) - len("char:")
    assert (old.vocab_size, tok.vocab_size, tok.spec) == (n + 4, n + 6, "chat:tools:" + alphabet)
    assert (tok.end_id, tok.tool_call_id, tok.tool_result_id) == (n + 3, n + 4, n + 5)
    assert tokenizer.base_spec(tok.spec) == tokenizer.base_spec(old.spec) == alphabet
    call = tools.openai_call("calculator", {"expression": "12 * 12"})
    wire = [{"role": "user", "content": "what is 12 * 12"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "144"}, {"role": "assistant", "content": "144"}]
    messages = tools.normalize_messages(wire)
    ids, mask = sft.render_conversation(messages, tok)
    text = tok.decode(ids)
    assert text == ('<|user|>what is 12 * 12<|end|><|assistant|><|tool_call|>{"name": "calculator", "arguments": '
                    '{"expression": "12 * 12"}}<|end|><|tool_result|>144<|end|><|assistant|>144<|end|>')
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == '<|tool_call|>{"name": "calculator", "arguments": {"expression": "12 * 12"}}<|end|>144<|end|>'
    prompt = tokenizer.apply_chat_template(messages[:1], tok, add_generation_prompt=True)
    reply = tok.decode(ids[len(prompt):ids.index(tok.end_id, len(prompt))])
    content, calls = tools.parse_tool_calls(reply, tools.tool_format(tokenizer.ChatTemplate(tok)))
    assert content == "" and calls_of(calls) == [("calculator", {"expression": "12 * 12"})]
    assert tokenizer.apply_chat_template(messages[:1], old, add_generation_prompt=True) == prompt[:len(prompt)]
    with pytest.raises(NanoError, match="no tool tokens") as e:
        tokenizer.apply_chat_template(messages, old)
    assert "\n" not in str(e.value)


def test_nanollm_tools_chat_template_renders_as_chat_pieces():
    """export.py's template for a "chat:tools:" model: transformers renders the text whose tokens
    are chat_pieces' ids (parallel calls, unicode arguments, a result, a system message)."""
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    import tokenizer

    tok = tokenizer.load_tokenizer("chat:tools:char:" + "".join(map(chr, range(32, 127))) + "ü°東京🗼")
    a, b = tools.openai_call("weather", ARGS_W), tools.openai_call("time", ARGS_T)
    messages = tools.normalize_messages([
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Zürich? 東京?"},
        {"role": "assistant", "content": "Both.", "tool_calls": [a, b]},
        {"role": "tool", "tool_call_id": a["id"], "content": "21"}, {"role": "tool", "tool_call_id": b["id"], "content": "23:05"},
        {"role": "assistant", "content": "21 °C; 23:05"}])
    source = tokenizer.nanollm_chat_template(tok)
    for n, gen in ((len(messages), False), (len(messages) - 1, True), (2, True)):
        text = chat_utils.render_jinja_template([messages[:n]], chat_template=source, add_generation_prompt=gen)[0][0]
        assert tok.encode(text) == tokenizer.apply_chat_template(messages[:n], tok, add_generation_prompt=gen)
    assert tokenizer.nanollm_chat_template(tokenizer.load_tokenizer("chat:gpt2")) == tokenizer.NANOLLM_CHAT_TEMPLATE
