"""Chat templates of open models (tests/data/templates, transcribed: no hub access here) rendered by
tokenizer.py == transformers' apply_chat_template: the prompt ids of turns 1-3 and of whole
conversations (system messages, unicode and whitespace at the edges), the SFT mask ==
return_assistant_tokens_mask on {% generation %} templates, the stop ids of generation_config.json,
and serve.py answering turns 2 and 3 through the openai client.

The tokenizer is GPT-2's byte-level BPE (assets/) written as a tokenizer.json with the templates'
special tokens added, loaded by transformers' PreTrainedTokenizerFast and by tokenizer.load_tokenizer."""

import json
import threading
from pathlib import Path

import pytest
import torch

import gpt
import serve
import sft
import tokenizer
import tools
from common import NanoError
from test_tokenizer import sp_base  # noqa: F401 (a fixture: the SentencePiece BPE trained offline)

transformers = pytest.importorskip("transformers", reason="transformers is the reference for chat templates")
TEMPLATES = Path(__file__).parent / "data" / "templates"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# name -> (bos, eos, the tokens generation_config.json's eos_token_id lists), as in each repository
MODELS = {
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "qwen2.5": (None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": (None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "mistral-v0.1": ("<s>", "</s>", ["</s>"]),
    "mistral-nemo": ("<s>", "</s>", ["</s>"]),
    "mistral-v0.3": ("<s>", "</s>", ["</s>"]),
    "gemma-2": ("<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    "gemma-3": ("<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    "phi-3.5": (None, "<|endoftext|>", ["<|end|>", "<|assistant|>", "<|endoftext|>"]),
    "phi-4-mini": (None, "<|endoftext|>", ["<|endoftext|>", "<|end|>"]),
}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|eom_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "[INST]",
            "[/INST]", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]  # Mistral v0.3's control tokens
# Qwen's: added tokens that are not special
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

SYSTEM = {"role": "system", "content": "You are brief.  Answer in one line. "}
TURNS = [("Héllo wörld 👋🏽, 日本語?", "\n\n- apple\n- pear  "), ("  and then?\n", "Ça va.\n\nFin 🍐"),
         (" a\tb  c\n\n", " ok ")]
NO_SYSTEM = {"gemma-2"}
TOOL_TEMPLATES = {"llama3.1": "llama3", "qwen2.5": "hermes", "qwen3": "hermes", "mistral-v0.3": "mistral",
                  "mistral-nemo": "mistral"}  # its template refuses a system message


def conversation(system, n_turns, answer_last=True):
    messages = [SYSTEM] if system else []
    for k, (user, answer) in enumerate(TURNS[:n_turns]):
        messages.append({"role": "user", "content": user})
        if k < n_turns - 1 or answer_last:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """GPT-2's BPE with the special tokens added, as a tokenizer.json."""
    path = tmp_path_factory.mktemp("chat") / "tokenizer.json"
    spec = tokenizer.to_tokenizer_json(tokenizer.bpe_from_gpt2_files())
    next_id = 50257
    for content in SPECIALS + ADDED:
        spec["added_tokens"].append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": content in SPECIALS})
        next_id += 1
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path.parent


@pytest.fixture(scope="module")
def ours(folder):
    return tokenizer.load_tokenizer(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_base(folder):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def pair(name, hf_base, source=None):
    """(our HFChatTemplate, transformers' tokenizer with the same template and special tokens)."""
    bos, eos, _ = MODELS.get(name, MODELS["qwen2.5"])
    source = source or (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    hf = hf_base
    hf.chat_template, hf.bos_token, hf.eos_token = source, bos, eos
    return tokenizer.HFChatTemplate(source, bos or "", eos), hf


def hf_ids(hf, messages, gen):
    return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("system", [False, True])
def test_prompt_ids_equal_transformers_turn_after_turn(name, system, ours, hf_base):
    template, hf = pair(name, hf_base)
    if system and name in NO_SYSTEM:
        with pytest.raises(NanoError, match="System role not supported"):
            tokenizer.apply_chat_template(conversation(system, 1, False), ours, template, True)
        with pytest.raises(Exception, match="System role not supported"):
            hf_ids(hf, conversation(system, 1, False), True)
        return
    for n in (1, 2, 3):  # serving: the whole conversation rendered and tokenized once
        messages = conversation(system, n, answer_last=False)
        assert template.text(messages, True) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(messages, ours, template, True) == hf_ids(hf, messages, True)
    messages = conversation(system, 3)
    ids = hf_ids(hf, messages, False)
    assert tokenizer.apply_chat_template(messages, ours, template) == ids
    # SFT: the same ids, and the mask covers the tokens that overlap the answers' characters
    # (tokenizers' offsets); templates that rewrite a conversation's beginning need markers
    try:
        text, spans = template.answer_spans(messages)
    except NanoError as e:
        assert name in ("qwen3", "phi-3.5", "phi-4-mini") or (name in ("mistral-nemo", "mistral-v0.3") and system), name
        assert "{% generation %}" in str(e)
        return
    got_ids, mask = sft.render_conversation(messages, ours, template=template)
    assert got_ids == ids
    offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert tokenizer.token_spans(ours, text, ids) == [tuple(o) for o in offsets]
    assert mask == [int(any(e > s0 and b < e0 for s0, e0 in spans)) for b, e in offsets]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    for (s0, e0), answer in zip(spans, answers):
        assert answer.strip() in text[s0:e0]


@pytest.mark.parametrize("name", ["qwen2.5-training", "qwen3-training"])
def test_generation_markers_give_transformers_assistant_mask(name, ours, hf_base):
    template, hf = pair(name, hf_base)
    assert template.has_generation
    for system in (False, True):
        messages = conversation(system, 3)
        want = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = sft.render_conversation(messages, ours, template=template)
        assert ids == list(want["input_ids"]) and mask == list(want["assistant_masks"]) and sum(mask) > 0
        # serving ignores the markers: the prompt is the plain rendering
        assert tokenizer.apply_chat_template(messages[:-1], ours, template, True) == hf_ids(hf, messages[:-1], True)


def test_segment_edges_are_not_split_qwen25(ours, hf_base):
    """The issue's case: an answer starting "\\n\\n- apple" after "assistant\\n" is one BPE piece
    across the edge; the whole text is tokenized once, as transformers does."""
    template, hf = pair("qwen2.5", hf_base)
    messages = [{"role": "user", "content": "fruit?"}, {"role": "assistant", "content": "\n\n- apple"}]
    ids, mask = sft.render_conversation(messages, ours, template=template)
    assert ids == hf_ids(hf, messages, False)
    text, [(start, _)] = template.answer_spans(messages)
    first = mask.index(1)  # the first learned token straddles the answer's edge: it began before it
    begin, end = tokenizer.token_spans(ours, text, ids)[first]
    assert begin < start < end and text[start:].startswith("\n\n- apple")


def test_find_reads_generation_config_stop_ids(folder, ours):
    """Llama 3.1 instruct: eos_token <|eot_id|> in tokenizer_config.json, generation_config.json's
    eos_token_id [<|end_of_text|>, <|eom_id|>, <|eot_id|>]; ChatTemplate.stop_ids holds all. An int
    eos_token_id works too."""
    bos, eos, stops = MODELS["llama3.1"]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": (TEMPLATES / "llama3.1.jinja").read_text(), "bos_token": bos, "eos_token": eos}))
    ids = [ours.encode(s)[0] for s in stops]
    for value, want in ((ids, set(ids)), (ids[0], {ids[0], ours.encode(eos)[0]})):
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        tok, chat = tokenizer.load_chat_template(str(folder / "tokenizer.json"))
        assert chat.stop_ids == want and tokenizer.stop_id(tok, chat.hf_template) == ours.encode(eos)[0]
    (folder / "generation_config.json").unlink()
    (folder / "tokenizer_config.json").unlink()


@pytest.mark.parametrize("name, system", [("qwen3", True), ("phi-4-mini", False), ("phi-3.5", True),
                                          ("mistral-nemo", True), ("llama3.1", True)])
def test_served_turns_two_and_three_answer(name, system, ours, hf_base, loopback):
    """Turns 1-3 through serve.make_server and the official openai client: each answers 200,
    with the prompt transformers tokenizes (usage.prompt_tokens)."""
    openai = pytest.importorskip("openai", reason="the official openai client is the reference")
    template, hf = pair(name, hf_base)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=256, vocab_size=ours.vocab_size, n_layer=1, n_head=2, n_embd=16))
    srv = serve.make_server(model, ours, template=tokenizer.ChatTemplate(ours, template), log_requests=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused",
                               max_retries=0, timeout=30)
        for n in (1, 2, 3):
            messages = conversation(system, n, answer_last=False)
            reply = client.chat.completions.create(model="nanollm", messages=messages, max_tokens=3, temperature=0)
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage.prompt_tokens == len(hf_ids(hf, messages, True))
    finally:
        srv.close()


def test_mistral_shaped_folder_loads_with_its_inst_template(tmp_path, sp_base, capsys):
    """A Mistral-7B-v0.1-shaped Hugging Face folder (SentencePiece BPE with byte fallback, built
    offline as in test_tokenizer.py, the [INST] template): sample.py --init_from runs, and the
    served prompt and greedy answer equal transformers' apply_chat_template + generate."""
    import sample
    from test_tokenizer import sp_tokenizer

    sp_tokenizer(tmp_path / "tokenizer.json", sp_base[1], "llama2")
    bos, eos, _ = MODELS["mistral-v0.1"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": "<unk>",
        "chat_template": (TEMPLATES / "mistral-v0.1.jinja").read_text()}))
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=803, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=None, bos_token_id=1, eos_token_id=2)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    sample.main(["--init_from", str(tmp_path), "--prompt", " [INST] Speak, man. [/INST]", "--max_new_tokens", "4",
                 "--num_samples", "1", "--device", "cpu", "--temperature", "0"])
    assert "Speak, man." in capsys.readouterr().out

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok, chat = tokenizer.load_chat_template(str(tmp_path / "tokenizer.json"))
    model, _ = sample.load_source(str(tmp_path), "cpu", torch.float32)
    messages = [SYSTEM, {"role": "user", "content": "Héllo  👋🏽"}, {"role": "assistant", "content": " Fair day. "},
                {"role": "user", "content": "Again?\n"}]
    ids = chat.render(messages)
    assert ids == hf_ids(hf_tok, messages, True) and chat.stop_ids == {hf_tok.eos_token_id}
    want = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, len(ids):]
    got = torch.stack(list(sample.generate(model, [ids], 6, temperature=0)), 1)[0]
    assert got.tolist() == want.tolist()


# ----------------------------------------------------------------------------------------
# Tools: OpenAI's `tools`, assistant `tool_calls` and `tool` messages, rendered as transformers'
# apply_chat_template(messages, tools=tools) renders them (Llama 3.1, Qwen2.5/3, Mistral v0.3/Nemo)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, now.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "local_time", "description": "Local time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
    tools.CALCULATOR_TOOL,
]


def wire_call(call_id, name, arguments):
    """A tool call as the openai client sends it back: arguments as a JSON string."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def tool_conversations():
    """name -> OpenAI wire messages: one call per turn over several turns, parallel calls with
    results, unicode arguments and results, a system message, content beside a call."""
    weather = wire_call("call_Wx7k2P9qLm", "get_weather", {"city": "Zürich", "unit": "celsius"})
    time = wire_call("call_T0ky0abc12", "local_time", {"zone": "東京 🗼"})
    calc = wire_call("call_c4lc9999ab", "calculator", {"expression": "3487 * 29"})
    return {
        "single, multi-turn": [
            SYSTEM, {"role": "user", "content": "Wie ist das Wetter in Zürich? 🌦"},
            {"role": "assistant", "content": None, "tool_calls": [weather]},
            {"role": "tool", "tool_call_id": weather["id"], "content": '{"temp": 21, "sky": "heiter ☀"}'},
            {"role": "assistant", "content": "21 °C, heiter."},
            {"role": "user", "content": "und 3487 * 29?"},
            {"role": "assistant", "content": None, "tool_calls": [calc]},
            {"role": "tool", "tool_call_id": calc["id"], "content": "101123"}],
        "parallel": [
            {"role": "user", "content": "Weather in Zürich and the time in 東京?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [weather, time]},
            {"role": "tool", "tool_call_id": weather["id"], "content": "21"},
            {"role": "tool", "tool_call_id": time["id"], "content": "23:05"},
            {"role": "assistant", "content": "21 °C in Zürich; 23:05 in 東京."},
            {"role": "user", "content": "thanks"}],
    }


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
@pytest.mark.parametrize("case", ["single, multi-turn", "parallel"])
def test_tools_render_as_transformers(name, case, ours, hf_base):
    """ids == apply_chat_template(messages, tools=tools, tokenize=True) for every prefix a server
    renders (after each tool result and each user turn) and for the whole conversation, from the
    wire messages tools.normalize_messages makes ready (arguments as dicts, Mistral's 9-character
    ids); Llama 3.1 refuses parallel calls in both."""
    template, hf = pair(name, hf_base)
    fmt = tools.FORMATS[TOOL_TEMPLATES[name]]
    assert tools.tool_format(template) is fmt and tools.tool_format(tokenizer.ChatTemplate(ours, template)) is fmt
    messages = tools.normalize_messages(tool_conversations()[case], fmt)
    if name == "llama3.1" and case == "parallel":
        with pytest.raises(NanoError, match="single tool-calls"):
            tokenizer.apply_chat_template(messages, ours, template, True, tools=TOOLS)
        with pytest.raises(Exception, match="single tool-calls"):
            hf.apply_chat_template(messages, tools=TOOLS, tokenize=False)
        return
    ends = [k + 1 for k, m in enumerate(messages) if m["role"] in ("user", "tool")
            and (k + 1 == len(messages) or messages[k + 1]["role"] != "tool")]
    for end in ends:
        prefix = messages[:end]
        want = hf.apply_chat_template(prefix, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert template.text(prefix, True, tools=TOOLS) == want
        assert ("Zürich" in want or "東京" in want) and "local_time" in want
        want_ids = list(hf.apply_chat_template(prefix, tools=TOOLS, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"])
        assert tokenizer.ChatTemplate(ours, template).render(prefix, tools=TOOLS) == want_ids
    whole = hf.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.apply_chat_template(messages, ours, template, tools=TOOLS) == list(whole)


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_parsed_reply_renders_back_as_the_model_wrote_it(name, ours, hf_base):
    """A call the model writes, parsed by its family's parser (tools.parse_tool_calls) and sent back
    by the client as the assistant message, renders to the text the model wrote."""
    template, _ = pair(name, hf_base)
    fmt = tools.tool_format(template)
    messages = tools.normalize_messages([{"role": "user", "content": "Zürich?"}], fmt)
    call = tools.normalize_call(wire_call("call_00000000ab", "get_weather", {"city": "Zürich"}), "call", fmt)
    prompt = template.text(messages, True, tools=TOOLS)
    written = template.text(messages + [{"role": "assistant", "content": "", "tool_calls": [call]}], tools=TOOLS)
    assert written.startswith(prompt)
    reply = written[len(prompt):].removesuffix(template.eos_token).removesuffix("<|im_end|>\n")
    content, calls = tools.parse_tool_calls(reply, fmt)
    content = content.removeprefix("<think>\n\n</think>")  # Qwen3's empty thoughts on the last answer
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}
    back = tools.normalize_messages([messages[0], {"role": "assistant", "content": content, "tool_calls": calls}], fmt)
    assert template.text(back, tools=TOOLS) == written.replace(call["id"], back[1]["tool_calls"][0]["id"])
