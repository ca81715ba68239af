"""Tool use (function calling): a model writes a call, the program runs it, the result goes back
into the conversation and the model answers with it. Toolformer (Schick et al. 2023,
arXiv:2302.04761) taught a model to call a calculator inside its own text; OpenAI's API made it a
protocol: the request lists `tools` (JSON schemas), the reply carries `tool_calls` (name + JSON
arguments) and `finish_reason: "tool_calls"`, the client runs them and sends `role: "tool"`
messages back. A chat template decides how all of that looks as tokens; each model family writes
its calls its own way, so a server needs one parser per family:

    hermes   (Qwen2.5, Qwen3)  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (one per call)
    llama3   (Llama 3.1/3.2)   {"name": "f", "parameters": {...}}  (JSON as the whole reply; "; " between calls)
    mistral  (Mistral v0.3+)   [TOOL_CALLS] [{"name": "f", "arguments": {...}}]  or  [TOOL_CALLS]f[ARGS]{...}
    nanollm  (sft.py's tokens) <|tool_call|>{"name": "f", "arguments": {...}}  (one call per assistant turn)

A reply that does not parse as a call stays ordinary content: a malformed call is text the model
wrote, never a server error. Streaming gives the same result as the whole reply: text that may
be the start of a call is held back until it is known to be one; a call is sent as OpenAI's
`delta.tool_calls` chunks (index, id and name first, then argument fragments) once it is complete.

A server speaks OpenAI's tools API with this file's public functions: `check_tools`, `check_tool_choice`
(400 on what they refuse); `normalize_messages(messages, tool_format(template))` for the request's
assistant `tool_calls` (arguments arrive as JSON strings; templates write dicts) and `tool` messages;
`template.render(messages, tools=tools)` (tokenizer.ChatTemplate) for the prompt; `parse_tool_calls`
or `ToolStream` for the reply (finish_reason "tool_calls" when it holds calls); `CallGrammar` and
`CallConstraint` for tool_choice "required" or a named function; `run_tool_call` with
{"calculator": calculator_text} where the server itself runs the calculator (serve.py --chat; the
chat page asks openai_api.py's POST /tools/calculator, which runs `calculate`), for a model that
`calls_tools`.

The calculator is the tool sft.py's `calculator` task teaches: arithmetic a small model cannot do
in its head. It evaluates an expression by walking its syntax tree with a whitelist (numbers,
+ - * / // % **, unary minus, parentheses); names, calls, attributes, huge powers and huge numbers
are refused with one line. It never calls eval or exec.

Run:
  python tools.py calc "3487 * 29 + 2**10"
  python tools.py parse hermes '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>'
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
import uuid
from dataclasses import dataclass

from common import NanoError

# ----------------------------------------------------------------------------------------
# The calculator: an AST whitelist, bounded numbers


MAX_DIGITS = 100            # no operand or result with more digits than this
MAX_EXPONENT = 1000         # 2**1000 is fine, 10**100000 is refused before it is computed
MAX_EXPRESSION_CHARS = 200
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, e.g. "3487 * 29" -> 101123. Raises NanoError on
    anything that is not plain arithmetic on numbers, or that would grow too large."""
    if not isinstance(expression, str) or not expression.strip():
        raise NanoError("calculator: empty expression (write arithmetic such as 12 * 34)")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise NanoError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters (shorten it)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise NanoError(f"calculator: {expression[:40]!r} is not an arithmetic expression "
                        "(numbers, + - * / // % ** and parentheses)") from None
    return evaluate(tree.body)


def evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise NanoError(f"calculator: exponent {right} is larger than {MAX_EXPONENT} (use a smaller power)")
        try:
            return bounded(BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise NanoError("calculator: division by zero") from None
        except OverflowError:
            raise NanoError("calculator: the result is too large") from None
    what = type(node).__name__
    raise NanoError(f"calculator: {what} is not allowed (only numbers, + - * / // % ** and parentheses)")


def bounded(value):
    if isinstance(value, complex):
        raise NanoError("calculator: the result is not a real number")
    size = abs(value)
    if isinstance(value, float) and size != size or size == float("inf"):
        raise NanoError("calculator: the result is not a finite number")
    if size >= 10 ** MAX_DIGITS:
        raise NanoError(f"calculator: a number with more than {MAX_DIGITS} digits (use smaller numbers)")
    return value


def calculator_text(expression: str) -> str:
    """What a tool message carries back: the value, or the calculator's error line."""
    try:
        return number_text(calculate(expression))
    except NanoError as e:
        return f"error: {e}"


def number_text(value) -> str:
    """A calculated value as the tool writes it: 6 / 3 -> "2", 1 / 4 -> "0.25"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def calls_tools(tok, template) -> bool:
    """Whether a model calls tools, so a chat front end offers it the calculator: nanollm's chat
    tokenizer with the tool tokens (sft.py --tasks calculator), or a template that writes tool calls."""
    return bool(getattr(tok, "tools", False)) or "tool_call" in str(getattr(template, "source", ""))


def run_tool_call(call: dict, functions: dict) -> str:
    """Run one OpenAI tool call with the functions given by name ({"calculator": calculator_text,
    ...}; each takes the call's arguments as keywords and returns text). Errors become the tool's
    text, so the model sees what went wrong."""
    name = call["function"]["name"]
    if name not in functions:
        return f"error: no tool named {name!r}"
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
        return str(functions[name](**arguments))
    except (ValueError, TypeError) as e:
        return f"error: {e}"


# ----------------------------------------------------------------------------------------
# Parsing a reply into OpenAI tool_calls, one parser per family


def new_call_id(length=None) -> str:
    """OpenAI's style "call_<24 hex>", or `length` alphanumeric characters (Mistral's templates
    refuse any id that is not 9 of them)."""
    return uuid.uuid4().hex[:length] if length else "call_" + uuid.uuid4().hex[:24]


def openai_call(name, arguments, call_id=None) -> dict:
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def call_from_json(obj, arguments_key="arguments"):
    """{"name": str, "arguments"|"parameters": object} -> an OpenAI tool call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return openai_call(obj["name"], arguments) if isinstance(arguments, dict) else None


def json_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def around_calls(texts):
    """The content of a reply with calls: its texts between them, less the whitespace that
    touches a call (a stream holds that whitespace back until it knows what follows)."""
    texts = [t.rstrip() if i == 0 else t.lstrip() if i == len(texts) - 1 else t.strip() for i, t in enumerate(texts)]
    return "".join(texts)


def parse_hermes(text):
    calls, pieces = [], re.split(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
    for body in pieces[1::2]:
        call = call_from_json(json_value(body.strip()))
        if call is None:
            return None
        calls.append(call)
    return around_calls(pieces[0::2]), calls


def parse_llama3(text):
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    calls = [call_from_json(json_value(part), "parameters") for part in re.split(r"(?<=\})\s*;\s*(?=\{)", body)]
    return ("", calls) if None not in calls else None


def parse_mistral(text):
    head, marker, body = text.partition("[TOOL_CALLS]")
    if not marker:
        return None
    body = body.strip()
    if body.startswith("["):  # v0.3: a JSON list of calls
        value = json_value(body)
        calls = [call_from_json(c) for c in value] if isinstance(value, list) and value else [None]
    else:                     # v11+: name[ARGS]{...}, repeated after each [TOOL_CALLS]
        calls = []
        for part in ("[TOOL_CALLS]" + body).split("[TOOL_CALLS]")[1:]:
            name, args_marker, arguments = part.partition("[ARGS]")
            value = json_value(arguments) if args_marker else None
            calls.append(openai_call(name.strip(), value) if name.strip() and isinstance(value, dict) else None)
    if None in calls:
        return None
    for call in calls:  # the ids its template accepts back: 9 letters and digits
        call["id"] = new_call_id(MISTRAL_ID_LENGTH)
    return head.rstrip(), calls


def parse_nanollm(text):
    """<|tool_call|>{...} once per call (several: parallel calls), after any content."""
    head, *bodies = text.split("<|tool_call|>")
    if not bodies:
        return None
    calls = [call_from_json(json_value(body.strip())) for body in bodies]
    return (head.rstrip(), calls) if None not in calls else None


MISTRAL_ID_LENGTH = 9


@dataclass(frozen=True)
class ToolFormat:
    name: str
    starts: tuple[str, ...]   # text that opens a call (held back while streaming)
    parse: callable           # reply text -> (content, calls), or None when it holds no valid call
    id_length: int | None = None  # tool call ids the template accepts: any (None), or this many alphanumerics


FORMATS = {f.name: f for f in (
    ToolFormat("hermes", ("<tool_call>",), parse_hermes),
    ToolFormat("llama3", ("<|python_tag|>", "{"), parse_llama3),
    ToolFormat("mistral", ("[TOOL_CALLS]",), parse_mistral, MISTRAL_ID_LENGTH),
    ToolFormat("nanollm", ("<|tool_call|>",), parse_nanollm),
)}


def format_of_template(source: str | None) -> ToolFormat:
    """The family of a chat template, read from how it writes a tool call."""
    source = source or ""
    if "<tool_call>" in source:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in source:
        return FORMATS["mistral"]
    if "<|python_tag|>" in source or "ipython" in source:
        return FORMATS["llama3"]
    return FORMATS["nanollm"]


def tool_format(template) -> ToolFormat:
    """The format of a tokenizer.ChatTemplate (or HFChatTemplate, or a Jinja source, or None for
    nanollm's own template)."""
    source = getattr(template, "source", template)
    return format_of_template(source if isinstance(source, str) else None)


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a whole reply; a reply with no valid call is all content."""
    parsed = fmt.parse(text)
    if parsed is None or not parsed[1]:
        return text, []
    return parsed


class ToolStream:
    """The streaming side of parse_tool_calls: feed() the reply's text deltas as they are decoded;
    each returns (content delta, tool-call deltas). Text that may still become a call is held back;
    at finish() the held text is parsed exactly as the whole reply would be, so a stream
    accumulates to the non-streamed answer."""

    def __init__(self, fmt: ToolFormat, argument_chunk=16):
        self.fmt, self.argument_chunk = fmt, argument_chunk
        self.text, self.sent = "", 0   # the reply so far, and how much of it went out as content
        self.holding = False           # from self.sent on, the text may be a call

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if self.holding:
            return "", []
        rest = self.text[self.sent:]
        start = self.call_start(rest)
        if start is not None:  # a call begins: hold it (and the whitespace before it) to the end
            self.holding, end = True, len(rest[:start].rstrip())
        else:                  # send all but what may still become a call's beginning
            end = len(rest) - self.held_back(rest)
        self.sent += end
        return rest[:end], []

    def finish(self) -> tuple[str, list[dict]]:
        rest = self.text[self.sent:]
        content, calls = parse_tool_calls(self.text, self.fmt) if self.holding else (self.text, [])
        self.sent = len(self.text)
        if not calls:  # it was not a call after all: the held text is content
            return rest, []
        already = self.text[:len(self.text) - len(rest)]
        return (content[len(already):] if content.startswith(already) else ""), self.deltas(calls)

    def call_start(self, rest):
        """Where a call starts in the unsent text: a marker, or (llama3) a JSON object that
        begins the reply."""
        spots = [rest.find(m) for m in self.fmt.starts if m != "{" and m in rest]
        if self.json_reply_possible() and rest.lstrip().startswith("{"):
            spots.append(len(rest) - len(rest.lstrip()))
        return min(spots) if spots else None

    def held_back(self, rest):
        """How much of the unsent text's end may still open a call: a marker's beginning, and
        the whitespace before it (whitespace that touches a call is not content)."""
        if self.json_reply_possible() and not rest.strip():
            return len(rest)
        markers = [m for m in self.fmt.starts if m != "{"]
        k = max((k for m in markers for k in range(1, len(m)) if rest.endswith(m[:k])), default=0)
        return len(rest) - len(rest[:len(rest) - k].rstrip())

    def json_reply_possible(self):
        return "{" in self.fmt.starts and not self.text[:self.sent].strip()

    def deltas(self, calls):
        """OpenAI's delta.tool_calls chunks: id, type and name first, then argument fragments."""
        out = []
        for index, call in enumerate(calls):
            out.append({"index": index, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""}})
            arguments = call["function"]["arguments"]
            for i in range(0, len(arguments), self.argument_chunk):
                out.append({"index": index, "function": {"arguments": arguments[i:i + self.argument_chunk]}})
        return out


# ----------------------------------------------------------------------------------------
# Checking a request's tools and tool_choice (the server answers 400 on what fails here)


def check_tools(tools) -> list[dict]:
    """OpenAI's `tools`: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?: a JSON schema object}}."""
    if not isinstance(tools, list) or not tools:
        raise NanoError("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise NanoError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise NanoError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or - (got {str(name)[:40]!r})")
        if name in names:
            raise NanoError(f"tools[{i}]: a second tool named {name!r} (names must be unique)")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise NanoError(f"tools[{i}].function.parameters must be a JSON schema object ({{\"type\": \"object\", ...}})")
    return tools


def normalize_messages(messages, fmt: ToolFormat | None = None) -> list[dict]:
    """OpenAI's request `messages` -> the messages chat templates read (tokenizer.ChatTemplate.render,
    transformers' apply_chat_template): roles system ("developer" too), user, assistant, tool;
    content a string (text parts joined; an assistant's null content with tool_calls -> "");
    assistant `tool_calls` as {"id", "type": "function", "function": {"name", "arguments": dict}}
    (the wire's JSON string decoded: templates write arguments with tojson); a tool message's
    `tool_call_id` must answer an earlier call. fmt: a ToolFormat whose template accepts only short
    ids (Mistral: 9 alphanumerics) gets every id cut to its last characters of that kind, calls and
    results alike (vLLM's convention). Raises NanoError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise NanoError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out, call_ids = [], set()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise NanoError(f"{where} must be an object with 'role' and 'content'")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise NanoError(f"{where}.role must be system, user, assistant or tool (got {str(role)[:20]!r})")
        message = {"role": role, "content": message_text(m.get("content"), where, role == "assistant"
                                                          and m.get("tool_calls") is not None)}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = [normalize_call(c, f"{where}.tool_calls[{k}]", fmt)
                                     for k, c in enumerate(checked_list(m["tool_calls"], f"{where}.tool_calls"))]
            call_ids.update(c["id"] for c in message["tool_calls"])
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise NanoError(f"{where}.tool_call_id is required: the id of the call this message answers")
            message["tool_call_id"] = short_id(call_id, fmt)
            if message["tool_call_id"] not in call_ids:
                raise NanoError(f"{where}.tool_call_id {call_id[:40]!r} answers no earlier assistant tool call "
                                "(send the assistant message with its tool_calls first)")
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def message_text(content, where, may_be_null=False) -> str:
    if content is None and may_be_null:
        return ""
    if isinstance(content, list):  # content parts: a text model reads the text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise NanoError(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}}")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise NanoError(f"{where}.content must be a string" + (" (or null with tool_calls)" if may_be_null else ""))
    return content


def checked_list(value, where):
    if not isinstance(value, list) or not value:
        raise NanoError(f"{where} must be a non-empty list")
    return value


def normalize_call(call, where, fmt=None) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise NanoError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise NanoError(f"{where}.function.name must be a non-empty string")
    if isinstance(arguments, str):
        arguments = json_value(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise NanoError(f"{where}.function.arguments must be a JSON object (as a string: '{{\"x\": 1}}')")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise NanoError(f"{where}.id must be a non-empty string (the id the tool message answers)")
    return {"id": short_id(call_id, fmt), "type": "function", "function": {"name": name, "arguments": arguments}}


def short_id(call_id, fmt):
    if fmt is None or not fmt.id_length:
        return call_id
    letters = re.sub(r"[^A-Za-z0-9]", "", call_id)
    if len(letters) < fmt.id_length:
        raise NanoError(f"tool call id {call_id[:40]!r} has fewer than {fmt.id_length} letters and digits, "
                        f"which this model's template needs")
    return letters[-fmt.id_length:]


def check_tool_choice(choice, tools):
    """"auto" | "none" | "required" | {"type": "function", "function": {"name": ...}} -> the choice,
    with a named function that is one of the tools."""
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise NanoError("tool_choice 'required' needs 'tools'")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise NanoError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise NanoError(f"tool_choice names {name!r}, which is not in 'tools'")
    return choice


# ----------------------------------------------------------------------------------------
# Constrained decoding: arguments that are valid JSON for the tool's schema, by construction
#
# With tool_choice "required" (or a named function) the reply must be a call. The call's text
# `{"name": "f", "arguments": {...}}` is a regular language once the schema is fixed (its nesting is
# bounded by the schema; strings, numbers and arrays get length bounds), so it compiles to an
# automaton over bytes: Thompson's construction (an NFA with empty moves), determinised lazily
# (Rabin-Scott subsets, built only as generation reaches them). Before each token, every token whose
# bytes would leave the automaton gets logit -inf (the mask of a state is computed once and
# cached), so whatever is sampled, at any temperature, the arguments parse and fit the schema. Keys
# come in the schema's order, all of them; strings hold printable ASCII and whole UTF-8 characters.

STRING_BYTES = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
UTF8_LEADS = {1: frozenset(range(0xC2, 0xE0)),                         # then 1 continuation byte
              2: frozenset(range(0xE1, 0xED)) | {0xEE, 0xEF},          # 2 (no overlong forms, no surrogates)
              3: frozenset(range(0xF1, 0xF4))}                         # 3 (below U+110000)
UTF8_TAIL = frozenset(range(0x80, 0xC0))
DIGITS, NONZERO = frozenset(b"0123456789"), frozenset(b"123456789")


class NFA:
    """States are numbers; edges[s] lists (bytes allowed or None for an empty move, target)."""

    def __init__(self):
        self.edges = []

    def state(self):
        self.edges.append([])
        return len(self.edges) - 1

    def chain(self, *classes):  # a sequence of byte classes -> (start, end)
        start = end = self.state()
        for allowed in classes:
            nxt = self.state()
            self.edges[end].append((frozenset(allowed), nxt))
            end = nxt
        return start, end

    def literal(self, text):
        return self.chain(*[{b} for b in text.encode("utf-8")])

    def seq(self, *parts):
        for (_, a_end), (b_start, _) in zip(parts, parts[1:]):
            self.edges[a_end].append((None, b_start))
        return parts[0][0], parts[-1][1]

    def alt(self, *parts):
        start, end = self.state(), self.state()
        for a, b in parts:
            self.edges[start].append((None, a))
            self.edges[b].append((None, end))
        return start, end

    def repeat(self, make, low, high):  # make() builds one fresh copy of the fragment
        parts = [make() for _ in range(high)]
        if not parts:
            return self.literal("")
        start, end = self.state(), self.state()
        self.seq((start, start), *parts, (end, end))
        for i in range(low, high):  # stop after i copies
            self.edges[parts[i - 1][1] if i else start].append((None, end))
        return start, end


def schema_fragment(nfa, schema, max_string=32, max_items=4, max_digits=12):
    """The NFA fragment of the JSON texts a (JSON) schema allows, with the length bounds given."""
    kind = schema.get("type", "object" if "properties" in schema else None)
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return nfa.alt(*[nfa.literal(json.dumps(v, ensure_ascii=False)) for v in values])
    if isinstance(kind, list) or "anyOf" in schema or "oneOf" in schema:
        options = [{**schema, "type": k} for k in kind] if isinstance(kind, list) else schema.get("anyOf", schema.get("oneOf"))
        return nfa.alt(*[schema_fragment(nfa, o, max_string, max_items, max_digits) for o in options])
    if kind == "string":
        high = min(schema.get("maxLength", max_string), max_string)
        return nfa.seq(nfa.literal('"'), nfa.repeat(lambda: utf8_char(nfa), schema.get("minLength", 0), high),
                       nfa.literal('"'))
    if kind in ("integer", "number"):
        digits = nfa.alt(nfa.literal("0"), nfa.seq(nfa.chain(NONZERO), nfa.repeat(lambda: nfa.chain(DIGITS), 0, max_digits - 1)))
        whole = nfa.seq(nfa.alt(nfa.literal("-"), nfa.literal("")), digits)
        if kind == "integer":
            return whole
        fraction = nfa.seq(nfa.literal("."), nfa.repeat(lambda: nfa.chain(DIGITS), 1, 6))
        return nfa.seq(whole, nfa.alt(fraction, nfa.literal("")))
    if kind == "boolean":
        return nfa.alt(nfa.literal("true"), nfa.literal("false"))
    if kind == "null":
        return nfa.literal("null")
    if kind == "array":
        item = lambda: schema_fragment(nfa, schema.get("items", {"type": "string"}), max_string, max_items, max_digits)  # noqa: E731
        rest = lambda: nfa.seq(nfa.literal(", "), item())  # noqa: E731
        high = min(schema.get("maxItems", max_items), max_items)
        items = nfa.alt(nfa.seq(item(), nfa.repeat(rest, max(schema.get("minItems", 0) - 1, 0), high - 1)), nfa.literal(""))
        return nfa.seq(nfa.literal("["), items, nfa.literal("]"))
    if kind == "object":
        parts, properties = [nfa.literal("{")], schema.get("properties", {})
        for i, (key, sub) in enumerate(properties.items()):
            parts += [nfa.literal((", " if i else "") + json.dumps(key, ensure_ascii=False) + ": "),
                      schema_fragment(nfa, sub, max_string, max_items, max_digits)]
        return nfa.seq(*parts, nfa.literal("}"))
    raise NanoError(f"constrained decoding does not know the schema {json.dumps(schema)[:60]} "
                    "(types: object, array, string, integer, number, boolean, null, enum, anyOf)")


def utf8_char(nfa):
    """One character inside a JSON string: printable ASCII but quote and backslash, or a whole
    multi-byte UTF-8 character."""
    ascii_char = nfa.chain(STRING_BYTES)
    return nfa.alt(ascii_char, *[nfa.chain(UTF8_LEADS[n], *[UTF8_TAIL] * n) for n in UTF8_LEADS])


def call_fragment(nfa, tools_list):
    """{"name": "f", "arguments": <f's schema>} for any of the tools."""
    return nfa.alt(*[nfa.seq(nfa.literal('{"name": ' + json.dumps(t["function"]["name"]) + ', "arguments": '),
                             schema_fragment(nfa, t["function"].get("parameters", {"type": "object"})),
                             nfa.literal("}")) for t in tools_list])


def token_bytes(tok) -> list:
    """Each token id's bytes (None for special tokens, which never appear inside JSON)."""
    if hasattr(tok, "base") and hasattr(tok, "special"):  # tokenizer.ChatTokenizer
        return token_bytes(tok.base) + [None] * (tok.vocab_size - tok.base.vocab_size)
    if hasattr(tok, "enc"):  # tiktoken
        special = set(tok.enc.special_tokens_set)
        return [None if tok.enc.decode([i]) in special else tok.enc.decode_single_token_bytes(i)
                for i in range(tok.vocab_size)]
    if hasattr(tok, "tok") and hasattr(tok.tok, "vocab"):  # a bpe.Tokenizer behind a file
        added = set(tok.tok.special_tokens.values()) | set(tok.tok.added_tokens.values())
        return [None if i in added else tok.tok.vocab.get(i) for i in range(tok.vocab_size)]
    return [tok.decode([i]).encode("utf-8") for i in range(tok.vocab_size)]


class CallGrammar:
    """The automaton of one tool call (call_fragment) and then a stop token, compiled for one
    tokenizer: shared by every request with the same tools; its subsets, moves and each state's
    mask over the vocabulary are cached, so a state's vocabulary scan is paid once."""

    def __init__(self, tok, tools_list, stop_ids):
        self.nfa = NFA()
        start, self.accept = call_fragment(self.nfa, tools_list)
        self.tokens = token_bytes(tok)
        self.stop_ids = sorted(stop_ids)
        self.by_first = {}
        for i, b in enumerate(self.tokens):
            if b:
                self.by_first.setdefault(b[0], []).append(i)
        self.moves, self.masks = {}, {}
        self.start = self.closure({start})

    def closure(self, states):
        stack, seen = list(states), set(states)
        while stack:
            for allowed, target in self.nfa.edges[stack.pop()]:
                if allowed is None and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)

    def move(self, state, byte):
        key = (state, byte)
        if key not in self.moves:
            targets = {t for s in state for allowed, t in self.nfa.edges[s] if allowed is not None and byte in allowed}
            self.moves[key] = self.closure(targets) if targets else None
        return self.moves[key]

    def walk(self, state, data):
        for byte in data:
            state = self.move(state, byte)
            if state is None:
                return None
        return state

    def mask(self, state):
        """Which token ids may come next in this state (a bool tensor over the vocabulary)."""
        import torch

        if state not in self.masks:
            mask = torch.zeros(len(self.tokens), dtype=torch.bool)
            firsts = {b for s in state for allowed, _ in self.nfa.edges[s] if allowed for b in allowed}
            for first in firsts:
                for i in self.by_first.get(first, ()):
                    mask[i] = self.walk(state, self.tokens[i]) is not None
            if self.accept in state:
                mask[self.stop_ids] = True
            if not mask.any():
                raise NanoError("the tokenizer has no token that continues the tool call (it cannot write JSON)")
            self.masks[state] = mask
        return self.masks[state]


class CallConstraint:
    """One reply held to a CallGrammar: mask = c.allowed() before sampling, c.advance(id) after;
    c.done once the stop token was sampled."""

    def __init__(self, grammar: CallGrammar):
        self.grammar, self.state = grammar, grammar.start

    def allowed(self):
        return self.grammar.mask(self.state)

    def advance(self, token_id):
        if token_id in self.grammar.stop_ids:
            self.state = frozenset()
            return
        data = self.grammar.tokens[token_id]
        nxt = self.grammar.walk(self.state, data) if data else None
        if nxt is None:
            raise NanoError(f"token {token_id} does not continue the tool call (sample from allowed())")
        self.state = nxt

    @property
    def done(self):
        return not self.state


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="the safe calculator and the tool-call parsers")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("calc", help="evaluate an arithmetic expression").add_argument("expression")
    parse = commands.add_parser("parse", help="a reply -> content and OpenAI tool_calls")
    parse.add_argument("format", choices=sorted(FORMATS))
    parse.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "calc":
            print(calculate(args.expression))
        else:
            content, calls = parse_tool_calls(args.text, FORMATS[args.format])
            print(json.dumps({"content": content, "tool_calls": calls}, ensure_ascii=False, indent=2))
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
