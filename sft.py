"""Supervised finetuning (SFT) on conversations: a chat template renders the messages to tokens and a loss mask, and the model learns the assistant's tokens only, e.g. <|user|>add 2 3<|end|><|assistant|>[5<|end|>] (in brackets: the tokens that carry loss). With no --data, a built-in task runs: python sft.py.

This is step 1 of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155): a pretrained model is
finetuned on demonstrations, conversations whose assistant turns show the wanted behaviour.
LIMA (Zhou et al. 2023, arXiv:2305.11206) showed how little data that takes when the
knowledge is already in the base model: SFT mostly teaches the shape of a turn and when to stop.

The chat template. A conversation is a list of {"role": "system"|"user"|"assistant",
"content": str} (the format of OpenAI, TRL and Hugging Face datasets), any number of turns.
For nanollm's own tokenizers four special tokens are appended after the base vocabulary,
<|system|> <|user|> <|assistant|> <|end|>, and every message becomes <|role|> content <|end|>.
Only the template writes those ids; content is encoded as plain text, so a user cannot forge
a turn by typing "<|assistant|>". The embedding (tied to the head) gets a row for each,
drawn from the Gaussian fitted to the existing rows (their mean and covariance; --chat_init
mean puts the mean itself, as Hewitt 2021, "Initializing New Word Embeddings for Pretrained
Language Models", proposes): a new token's logit then starts as ordinary as an old token's,
so adding it leaves the model's predictions almost unchanged, where a row of another scale
could take over the softmax. The mean alone makes the four tokens one identical input until
training pulls them apart, which measured slower to learn on the built-in task. The
checkpoint records the tokenizer as "chat:<base spec>" (ChatTokenizer). For a Hugging Face
model whose tokenizer_config.json has a `chat_template`, that Jinja template is rendered
instead, the way transformers' apply_chat_template renders it (jinja2 comes with torch). The
tokenizer side of a template (a conversation -> ids, the Jinja environment, the token that ends
a turn) lives in tokenizer.py beside ChatTokenizer, as transformers keeps apply_chat_template on the
tokenizer: serve.py renders its prompts there. This file adds what only training needs, the mask.

The mask. `render_conversation` returns the ids and a mask: 1 on each assistant message's
content and on the <|end|> closing it (so the model learns to stop), 0 elsewhere. Token t is
trained to predict token t+1 where mask[t+1] is 1. For [user "add 2 3", assistant "5"] with a
character tokenizer (`show_mask` prints this; tests/test_sft.py checks it):

    token  <|user|>  a  d  d  ␣  2  ␣  3  <|end|>  <|assistant|>  5  <|end|>
    mask      0      0  0  0  0  0  0  0     0           0        1     1

A Hugging Face template renders the whole conversation to one text, tokenized once (its ids are
transformers' apply_chat_template(..., tokenize=True); tokenizing pieces separately would cut a BPE
piece at an answer's edge, e.g. Qwen2.5's "assistant\n" + "\n\n- apple" is 'ĊĊ','Ċ' whole and
'Ċ','ĊĊ' in pieces). A token carries loss where it overlaps an answer's characters, as
transformers' return_assistant_tokens_mask marks tokens. Where the answers are:
- the template marks them with {% generation %} (TRL's training templates): those spans, so the
  mask equals return_assistant_tokens_mask (tested);
- no markers: completion-only, this file's convention. Prefixes are rendered
  (tokenizer.HFChatTemplate.answer_spans): the text of messages[:i] with the generation prompt ends
  where assistant message i starts, the text of messages[:i+1] where it ends; that span (the answer
  plus what the template closes it with, e.g. "<|im_end|>\n") is learned, the role header not.
  transformers has no mask without markers; the training templates of the Qwen2.5/Qwen3 family
  that TRL users take put the "assistant\n" header inside the markers (loss on the header), this
  convention does not.
  Templates that render a conversation's beginning differently from the beginning of its text
  (Qwen3, Phi-3.5/4-mini, Mistral-Nemo with a system message) have no such spans: SFT asks for a
  template with markers there. Serving never needs spans.

Batches are packed: conversations are laid one after another into rows of block_size tokens
(next fit: one that does not fit starts a new row). Each conversation's positions restart at
0 and a block-diagonal causal mask (B, 1, T, T) lets a token attend only to earlier tokens of
its own conversation, so a packed row computes exactly what the conversations compute alone
(tested), with no attention across them. Why pack: chat data mixes 10-token and 1000-token
conversations, and padding a batch to its longest row spends most of the compute on pad
tokens (bench.py "sft" measures both). What packing costs: an explicit mask instead of
is_causal, which rules out the fused flash kernel on GPUs (FlashAttention's varlen kernels
are the fast way to do the same). --pack False pads on the right instead (causal attention
never lets a real token see a pad, so no mask is needed). The loss is the mean over every
target token of the batch, so a long answer weighs more than a short one (TRL's default).

Built-in task (no --data): a character-level GPT (2 layers, 128 wide) is pretrained on Tiny
Shakespeare for 300 steps (--init_from a checkpoint skips that), then taught an instruction
with a checkable answer, "reverse: abc" -> "cba", from conversations of 1-3 exchanges, some
after a system message. Exact-match accuracy of greedy answers on held-out prompts (words that
no training conversation contains) is printed before (0%: the base talks Shakespeare) and
after (100% in the runs measured). --tasks reverse,upper,add mixes in "upper: abc" -> "ABC"
and "add 12 34" -> "46"; two-digit addition is learned far more slowly at this size (1-3%
after 1000 steps of a 4-layer model, when reversal was at 100%), so it is not in the default.

Tool use (--tasks calculator). Conversations may call tools (OpenAI's form: assistant
`tool_calls`, `tool` messages; a --data row in the wire form, arguments as JSON strings, is read
through tools.normalize_messages). nanollm's template then needs two more tokens, so the chat
tokenizer becomes "chat:tools:<base>" (<|tool_call|> <|tool_result|> after the four; "chat:"
checkpoints keep their four): the call is part of the answer, the tool's result is given:

    <|user|>what is 3487 * 291?<|end|>
    <|assistant|>[<|tool_call|>{"name": "calculator", "arguments": {"expression": "3487 * 291"}}<|end|>]
    <|tool_result|>1014717<|end|><|assistant|>[1014717<|end|>]

The built-in calculator task asks for 4-digit times 3-digit products (7-digit results) and 4-digit
sums (5-digit results), beyond a 2-layer char model's head; a quarter of its conversations answer
directly under the system message "answer without tools". Its model learns from scratch
(--base_iters 0, 1000 iterations: the task's defaults). The evaluation is the agent loop
(answers_with_tools): the model's call is run by the real calculator (tools.calculator_text), the
result fed back, the answer read; then the same model is asked under "answer without tools".
Printed last: `exact match with the tool: X% without: Y%`. Measured 12-07 under load (2 shared CPU
cores, 1 torch thread), `python sft.py --tasks calculator`, 200 held-out questions, seeds 1337 / 7 / 1 /
2 / 3: 95.5% / 99.5% / 100% / 100% / 99.0% with the tool, 0% without, 115-170 s each. The model copies the result into
its answer by position: with results of mixed widths (6- or 7-digit products, 4- or 5-digit sums)
it got the majority widths right and the others' last digits wrong (71.5%); 300 steps of
Shakespeare first left it at 0.5%; 700 iterations gave 100% and 74% for two seeds.

Run:
  python sft.py                                             # built-in task, ~40 s on 2 idle CPU cores (more on a busy machine)
  python sft.py --tasks calculator                          # tool calls, ~2.5 min on 2 busy CPU cores
  python sft.py --init_from out/ckpt.pt --data chat.jsonl   # {"messages": [...]} per line
  python sft.py --init_from gpt2 --data chat.jsonl --lora True --learning_rate 2e-4
  python sft.py --init_from path/to/hf_model --data chat.jsonl --qlora True   # its chat_template
  -> out-sft/ckpt.pt, a plain checkpoint (LoRA merged) that sample.py, dpo.py and serve.py read:
     python sample.py --ckpt out-sft/ckpt.pt --prompt "<|user|>reverse: abc<|end|><|assistant|>" \
         --temperature 0 --stop_at_eot True
     and out-sft/metrics.jsonl.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import common
import data
import finetune
import gpt
import lora
import sample
import tokenizer
import tools
from common import NanoError

# the chat tokenizer (a base tokenizer plus <|system|> <|user|> <|assistant|> <|end|>, spec
# "chat:<base spec>") and the rendering of a conversation to ids live in tokenizer.py beside the other
# tokenizer specs, so every script loads them; this file adds the loss mask
from tokenizer import ROLES, ChatTokenizer, HFChatTemplate, chat_pieces, load_tokenizer, stop_id, token_spans

# ----------------------------------------------------------------------------------------
# Rendering a conversation: ids and the loss mask


def check_messages(messages, where="conversation", need_assistant=True):
    """One-line NanoError naming `where` for anything the template cannot render."""
    if not isinstance(messages, list) or not messages:
        raise NanoError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise NanoError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES + ("tool",):
            raise NanoError(f"{where}: message {i} has unknown role {m['role']!r} (use system, user, assistant or tool)")
        if not isinstance(m["content"], str):
            raise NanoError(f"{where}: message {i} ({m['role']}) has {type(m['content']).__name__} content "
                            "(content must be a string)")
        if not m["content"].strip() and not m.get("tool_calls"):
            raise NanoError(f"{where}: message {i} ({m['role']}) has empty content (fill it in or drop the message)")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise NanoError(f"{where}: no assistant message (nothing to learn; every conversation needs one)")


def render_conversation(messages, tok, add_generation_prompt=False, template=None):
    """(ids, mask): the conversation's token ids (tokenizer.apply_chat_template's, equal to
    transformers') and 1 where a token carries loss, 0 elsewhere. nanollm's template (template
    None, a ChatTokenizer): the loss is on each assistant message's content and the <|end|>
    closing it; the role tokens and every other message are given, never predicted. A Hugging
    Face template: the whole text is tokenized once (so no BPE piece is cut at an answer's edge)
    and a token carries loss where it overlaps an answer's characters (HFChatTemplate.answer_spans:
    the {% generation %} blocks, or the completion-only spans). add_generation_prompt appends the
    opening of an assistant turn (for generation)."""
    if template is None:
        ids, mask = [], []
        for piece, answer in chat_pieces(messages, tok, add_generation_prompt):
            ids += piece
            mask += [int(answer)] * len(piece)
        return ids, mask
    text, spans = template.answer_spans(messages, add_generation_prompt)
    ids = tok.encode(text)
    mask, k = [0] * len(ids), 0
    for t, (start, end) in enumerate(token_spans(tok, text, ids)):  # as return_assistant_tokens_mask
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = int(end > spans[k][0])
    return ids, mask


def show_mask(ids, mask, tok):
    """Two aligned lines, tokens and mask, as in the module docstring."""
    tokens = [tok.decode([i]).replace(" ", "␣").replace("\n", "⏎") for i in ids]
    widths = [max(len(t), 1) for t in tokens]
    return ("token  " + "  ".join(t.center(w) for t, w in zip(tokens, widths)) + "\n"
            + "mask   " + "  ".join(str(m).center(w) for m, w in zip(mask, widths))).rstrip()


# ----------------------------------------------------------------------------------------
# The model side: room for the chat tokens


def chat_rows(base_rows, n_new, init="gaussian", generator=None):
    """Rows for new tokens from the existing rows (n, C): "mean", every new row the mean
    (Hewitt 2021), or "gaussian", draws from N(mean, covariance) of the existing rows, which
    keeps a new token's logit as ordinary as any old token's while making the new tokens
    distinguishable from each other as inputs. x = mean + D^T z / sqrt(n) with D = rows - mean
    and z ~ N(0, I_n) has covariance D^T D / n exactly, so no Cholesky factor is needed."""
    rows = base_rows.float()
    mean = rows.mean(0)
    if init == "mean":
        return mean.expand(n_new, -1).clone()
    if init != "gaussian":
        raise NanoError(f"unknown chat token init {init!r} (mean or gaussian)")
    z = torch.randn(n_new, rows.shape[0], generator=generator).to(rows.device)
    return mean + z @ (rows - mean) / math.sqrt(rows.shape[0])


def add_chat_tokens(model: gpt.GPT, tok: ChatTokenizer, init="gaussian", seed=0):
    """Give the embedding (and the head, tied or not) rows for the chat tokens (`chat_rows`).
    A model whose vocab_size is padded (50304 for GPT-2's 50257) already has spare rows:
    they are reused, else the matrices grow."""
    n_base, n_chat = tok.base.vocab_size, tok.vocab_size
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    generator = torch.Generator().manual_seed(seed)

    def with_chat_rows(w):  # (V, C) -> (max(V, n_chat), C)
        new = w.new_empty(max(w.shape[0], n_chat), w.shape[1])
        new[:w.shape[0]] = w
        new[n_base:n_chat] = chat_rows(w[:n_base], n_chat - n_base, init, generator).to(w.dtype)
        return nn.Parameter(new, requires_grad=w.requires_grad)

    with torch.no_grad():
        wte.weight = with_chat_rows(wte.weight.data)
        head.weight = wte.weight if tied else with_chat_rows(head.weight.data)
    wte.num_embeddings = head.out_features = wte.weight.shape[0]
    model.config.vocab_size = wte.weight.shape[0]
    return model


def train_only_rows(param: nn.Parameter, first: int, last: int):
    """With LoRA the embedding is frozen except the chat tokens' rows (PEFT's
    trainable_token_indices): the gradient of every other row is zeroed, and the parameter
    is kept out of weight decay, so AdamW leaves those rows exactly as they were."""
    param.requires_grad_(True)
    param.no_weight_decay = True
    keep = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    keep[first:last] = 1
    param.register_hook(lambda grad: grad * keep.to(grad.dtype))


# ----------------------------------------------------------------------------------------
# Examples and batches


def to_example(ids, mask, block_size):
    """(x, y): the model reads x = ids[:-1] and predicts y[t] = ids[t + 1] where mask[t + 1],
    -1 elsewhere; cut to block_size tokens. None when no target is left."""
    x = ids[:-1][:block_size]
    y = [t if m else -1 for t, m in zip(ids[1:], mask[1:])][:block_size]
    return (x, y) if any(t != -1 for t in y) else None


def collate_padded(examples):
    """(B, T_max) right-padded with id 0 and target -1; causal attention never lets a real
    token see a later pad, so no attention mask is needed."""
    T = max(len(x) for x, _ in examples)
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        idx[b, :len(x)], targets[b, :len(y)] = torch.tensor(x), torch.tensor(y)
    return {"idx": idx, "targets": targets, "position_ids": None, "attn_mask": None,
            "n_tokens": sum(len(x) for x, _ in examples)}


def collate_packed(rows):
    """rows: lists of examples, each list's lengths summing to at most T. Returns (B, T) ids
    and targets, positions restarting at 0 per conversation, and the (B, 1, T, T) mask:
    query i sees key j iff j <= i and both belong to the same conversation."""
    T = max(sum(len(x) for x, _ in row) for row in rows)
    B = len(rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segment = torch.zeros(B, T, dtype=torch.long)  # which conversation each slot holds
    for b, row in enumerate(rows):
        at = 0
        for s, (x, y) in enumerate(row):
            n = len(x)
            idx[b, at:at + n], targets[b, at:at + n] = torch.tensor(x), torch.tensor(y)
            position_ids[b, at:at + n] = torch.arange(n)
            segment[b, at:at + n] = s
            at += n
        # the empty tail is a segment of its own: every query must see some key (itself),
        # or softmax over nothing gives NaN
        segment[b, at:] = len(row)
        position_ids[b, at:] = torch.arange(T - at)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    return {"idx": idx, "targets": targets, "position_ids": position_ids, "attn_mask": attn_mask[:, None],
            "n_tokens": sum(len(x) for row in rows for x, _ in row)}


def make_batches(examples, order, batch_size, block_size, pack=True):
    """Batches of examples taken in `order` (indices; an endless iterator when training).
    Packed: next fit into rows of at most block_size tokens, batch_size rows a batch.
    Padded: batch_size conversations a batch."""
    group, row, used = [], [], 0
    for i in order:
        ex = examples[i]
        if not pack:
            group.append(ex)
            if len(group) == batch_size:
                yield collate_padded(group)
                group = []
            continue
        if row and used + len(ex[0]) > block_size:  # does not fit: close the row, start the next
            group.append(row)
            row, used = [], 0
            if len(group) == batch_size:
                yield collate_packed(group)
                group = []
        row.append(ex)
        used += len(ex[0])
    if row:
        group.append(row)
    if group:
        yield collate_packed(group) if pack else collate_padded(group)


def shuffled_forever(n, generator):
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def batch_loss(model, batch):
    """Mean cross-entropy over the batch's target tokens (gpt.py's chunked loss ignores -1)."""
    _, loss = model(batch["idx"], targets=batch["targets"], position_ids=batch["position_ids"],
                    attn_mask=batch["attn_mask"])
    return loss


# ----------------------------------------------------------------------------------------
# Data files


def read_conversations(path):
    """[(where, messages)] from a .jsonl of {"messages": [...]}, every row checked before any
    model is loaded; a bad row is a one-line error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"data file {path} not found (a .jsonl with one {{\"messages\": [...]}} per line)")
    rows = []
    for n, line in enumerate(data.read_text_file(path, "--data").splitlines(), 1):  # binary: one line
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise NanoError(f"{where}: expected an object with a 'messages' list")
        messages = row["messages"]
        if isinstance(messages, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or "tool_calls" in m)
                                              for m in messages):
            try:  # OpenAI's wire form (arguments as JSON strings) -> what templates read
                messages = tools.normalize_messages(messages)
            except NanoError as e:
                raise NanoError(f"{where}: {e}") from None
        check_messages(messages, where)
        rows.append((where, messages))
    if not rows:
        raise NanoError(f"{path} has no conversations (one {{\"messages\": [...]}} per line)")
    return rows


def encode_conversations(rows, tok, template, block_size):
    """Render and cut every conversation -> (examples, number truncated, number dropped)."""
    examples, truncated, dropped = [], 0, 0
    for where, messages in rows:
        try:
            ids, mask = render_conversation(messages, tok, template=template)
        except NanoError as e:
            raise NanoError(f"{where}: {e}") from None
        truncated += len(ids) - 1 > block_size
        ex = to_example(ids, mask, block_size)
        if ex is None:
            dropped += 1  # the first assistant token lies beyond block_size
        else:
            examples.append(ex)
    return examples, truncated, dropped


# ----------------------------------------------------------------------------------------
# The built-in task: instructions with checkable answers; held-out items for the test

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM_PROMPTS = ("be brief", "answer only", "you are a helpful assistant")


def word(rng):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def two_numbers(rng):
    return f"{rng.randint(10, 99)} {rng.randint(10, 99)}"  # two digits each: the digits sit at fixed places


# name -> (draw an item, the prompt for it, its answer)
TASKS = {
    "reverse": (word, lambda w: f"reverse: {w}", lambda w: w[::-1]),
    "upper": (word, lambda w: f"upper: {w}", str.upper),
    "add": (two_numbers, lambda ab: f"add {ab}", lambda ab: str(sum(map(int, ab.split())))),
}


def held_out(item: str) -> bool:
    """One item in ten (by a fixed hash) never appears in training: the test draws from these."""
    return zlib.crc32(item.encode()) % 10 == 0


def task(rng, names, test: bool):
    """One (prompt, answer) of a task among `names`, from the held-out items or from the others."""
    draw, prompt, answer = TASKS[rng.choice(names)]
    while True:
        item = draw(rng)
        if held_out(item) == test:
            return prompt(item), answer(item)


def synthetic_conversation(rng, names=("reverse",), test=False):
    """70% are one exchange; the others 2-3 exchanges, half of them after a system message."""
    if rng.random() < 0.7:
        return [{"role": r, "content": c} for r, c in zip(("user", "assistant"), task(rng, names, test))]
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(2, 3)):
        prompt, answer = task(rng, names, test)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages


# The calculator task (--tasks calculator): arithmetic beyond a small model's head (4-digit times
# 3-digit with a 7-digit product, 4-digit plus 4-digit with a 5-digit sum), which it learns to hand
# to tools.calculator_text. A conversation:
#   <|user|>what is 3487 * 291?<|end|>
#   <|assistant|><|tool_call|>{"name": "calculator", "arguments": {"expression": "3487 * 291"}}<|end|>
#   <|tool_result|>1014717<|end|><|assistant|>1014717<|end|>
# (the loss on the call and on the answer). A quarter of them show the other way, under the system
# message NO_TOOLS: the answer straight away, so the same model can be asked without the tool.

NO_TOOLS = "answer without tools"


def arithmetic(rng):
    """4-digit times 3-digit with a 7-digit product, or 4-digit plus 4-digit with a 5-digit sum:
    fixed widths everywhere, so the call copies the question's digits and the answer copies the
    result's from fixed distances. A small model copies by position: with results of mixed
    widths (6-digit products, 4-digit sums) it answered the majority width right and missed the
    others' last digits."""
    times = rng.random() < 0.5
    while True:
        a, b = rng.randint(1000, 9999), rng.randint(100, 999) if times else rng.randint(1000, 9999)
        if len(str(a * b if times else a + b)) == (7 if times else 5):
            return f"{a} {'*' if times else '+'} {b}"


def calculator_conversation(rng, test=False, direct=None):
    while held_out(expression := arithmetic(rng)) != test:
        pass
    direct = rng.random() < 0.25 if direct is None else direct
    question, answer = f"what is {expression}?", tools.calculator_text(expression)
    if direct:
        return [{"role": "system", "content": NO_TOOLS}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": answer},
            {"role": "assistant", "content": answer}]


@torch.no_grad()
def greedy_replies(model, tok, conversations, max_new_tokens, template=None):
    """Greedy reply to each conversation (sample.generate at temperature 0, the prompts as one
    left-padded batch), up to the end of the assistant's turn, decoded."""
    was_training = model.training
    model.eval()
    stop = stop_id(tok, template)
    rows = [render_conversation(c, tok, True, template)[0] for c in conversations]
    steps = min(max_new_tokens, model.config.block_size - max(len(r) for r in rows))  # no window slides
    answers = [[] for _ in rows]
    for token in sample.generate(model, rows, steps, temperature=0, eos_id=stop):
        for answer, t in zip(answers, token.tolist()):
            answer.append(t)
    model.train(was_training)
    return [tok.decode(a[:a.index(stop)] if stop in a else a) for a in answers]


def greedy_answers(model, tok, prompts, max_new_tokens, template=None):
    """Greedy answer to each single-turn prompt."""
    return greedy_replies(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens, template)


def answers_with_tools(model, tok, questions, functions, max_new_tokens=96, use_tools=True):
    """The agent loop, batched and greedy: each question is asked; a reply that calls tools
    (tools.parse_tool_calls) has them run (tools.run_tool_call: the real functions), the results
    fed back as tool messages, and the model asked again, up to 3 rounds. use_tools=False asks
    under NO_TOOLS, and a call the model makes anyway is not run (its answer is the call's text).
    Returns the final replies and how many of them called a tool."""
    fmt = tools.FORMATS["nanollm"]
    system = [] if use_tools else [{"role": "system", "content": NO_TOOLS}]
    conversations = [system + [{"role": "user", "content": q}] for q in questions]
    final, pending, called = [None] * len(questions), list(range(len(questions))), 0
    for _ in range(3):
        replies = greedy_replies(model, tok, [conversations[k] for k in pending], max_new_tokens)
        still = []
        for k, reply in zip(pending, replies):
            content, calls = tools.parse_tool_calls(reply, fmt)
            if not (calls and use_tools):
                final[k] = reply
                continue
            called += 1
            conversations[k] += tools.normalize_messages(
                [{"role": "assistant", "content": content, "tool_calls": calls}]
                + [{"role": "tool", "tool_call_id": c["id"], "content": tools.run_tool_call(c, functions)}
                   for c in calls])
            still.append(k)
        pending = [k for k in still if len(render_conversation(conversations[k], tok, True)[0]) < model.config.block_size]
        for k in set(still) - set(pending):
            final[k] = ""  # no room left to answer
        if not pending:
            break
    return [f if f is not None else "" for f in final], called


def calculator_exact_match(model, tok, tests):
    """(exact match with the tool, without it, share of questions that called the tool) on
    held-out (question, answer) pairs."""
    questions = [q for q, _ in tests]
    with_tool, called = answers_with_tools(model, tok, questions, {"calculator": tools.calculator_text})
    without, _ = answers_with_tools(model, tok, questions, {}, use_tools=False)
    score = lambda got: sum(a == want for a, (_, want) in zip(got, tests)) / len(tests)  # noqa: E731
    return score(with_tool), score(without), called / len(tests)


def exact_match(model, tok, tests, template=None):
    answers = greedy_answers(model, tok, [p for p, _ in tests], 8, template)
    return sum(a == want for a, (_, want) in zip(answers, tests)) / len(tests), answers


def shakespeare_examples(tok, block_size, val_fraction=0.1):
    """Pretraining as a special case of this file's loop: windows of Tiny Shakespeare whose
    every token carries loss (mask all ones), each filling one packed row."""
    ids = tok.encode(data.SHAKESPEARE_PATH.read_text(encoding="utf-8"))
    windows = [to_example(ids[s:s + block_size + 1], [1] * (block_size + 1), block_size)
               for s in range(0, len(ids) - block_size - 1, block_size)]
    n_val = int(len(windows) * val_fraction)
    return windows[:-n_val], windows[-n_val:]


# ----------------------------------------------------------------------------------------
# Config, training loop, CLI


@dataclass
class SFTConfig:
    data: str = field(default="", metadata={"help": "a .jsonl of {\"messages\": [{\"role\", \"content\"}, ...]} "
                                                    "per line; empty: the built-in task"})
    init_from: str = field(default="", metadata={
        "help": "checkpoint path, gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a Hugging Face model folder or "
                "hub name; empty: the built-in task's base (out_dir/base.pt, pretrained here if missing)"})
    out_dir: str = field(default="out-sft", metadata={"help": "ckpt.pt and metrics.jsonl go here"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of --data for the eval loss"})
    block_size: int = field(default=0, metadata={"help": "tokens per row; longer conversations are cut "
                                                         "(0: the model's block_size)"})
    pack: bool = field(default=True, metadata={"help": "pack conversations into rows (False: pad each to the longest)"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch (conversations, with --pack False)"})
    grad_accum: int = 1
    max_iters: int = field(default=-1, metadata={"help": "-1: 700, and 1000 with --tasks calculator"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak LR (the built-in task's; ~2e-5 for full "
                                                                 "finetuning of GPT-2, ~2e-4 with LoRA)"})
    min_lr_ratio: float = field(default=0.5, metadata={"help": "cosine decay ends at learning_rate * this"})
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout during finetuning"})
    chat_init: str = field(default="gaussian", metadata={
        "help": "rows of the new chat tokens: gaussian (draws from N(mean, cov) of the embedding) or mean"})
    eval_interval: int = 100
    eval_iters: int = field(default=0, metadata={"help": "val batches per eval (0: all held-out conversations)"})
    log_interval: int = 50
    tracker: str = field(**common.tracker_option())
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (lora.py) and the chat tokens' rows "
                                                        "only; merged into ckpt.pt at the end"})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a frozen NF4 base (qlora_nf4.py)"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = field(default="auto", metadata={
        "help": "comma-separated Linear names to adapt; auto: every projection (GPT-2: c_attn,c_proj,c_fc; "
                "Llama family: q/k/v/o_proj, gate/up/down_proj)"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto, float32, bfloat16, float16"})
    seed: int = 1337
    # the built-in task
    tasks: str = field(default="reverse", metadata={
        "help": "built-in task: a comma-separated mix of reverse, upper, add (two-digit addition learns "
                "far slower at this size), calculator (tool calls for 4-digit arithmetic; its base is "
                "pretrained with a block of at least 128)"})
    n_train: int = field(default=6000, metadata={"help": "built-in task: training conversations"})
    n_test: int = field(default=200, metadata={"help": "built-in task: held-out prompts for exact match"})
    base_iters: int = field(default=-1, metadata={
        "help": "built-in task: pretraining iterations of its base on Tiny Shakespeare (-1: 300, and 0 with "
                "--tasks calculator, which learns from scratch)"})
    base_layer: int = 2
    base_head: int = 4
    base_embd: int = 128
    base_block: int = 64
    base_arch: str = field(default="gpt2", metadata={
        "help": "built-in task: the base's block, gpt2 | llama (RoPE, RMSNorm, SwiGLU: relative positions copy better)"})


def builtin_rows(cfg):
    """The built-in task's (train rows, held-out rows, reverse/upper/add tests, calculator tests):
    with the calculator among other tasks, half the conversations are calculator ones."""
    rng, names = random.Random(cfg.seed), cfg.tasks.split(",")
    others = [n for n in names if n != "calculator"]

    def conversation(test):
        if "calculator" in names and (not others or rng.random() < 0.5):
            return calculator_conversation(rng, test)
        return synthetic_conversation(rng, others, test)

    rows = [(f"synthetic conversation {i}", conversation(False)) for i in range(cfg.n_train)]
    val_rows = [(f"held-out conversation {i}", conversation(True)) for i in range(200)]
    tests = [task(rng, others, test=True) for _ in range(cfg.n_test)] if others else None
    calculator_tests = None
    if "calculator" in names:
        calculator_tests = [(m[0]["content"], m[-1]["content"])
                            for m in (calculator_conversation(rng, True, direct=False) for _ in range(cfg.n_test))]
    return rows, val_rows, tests, calculator_tests


def task_defaults(cfg: SFTConfig) -> SFTConfig:
    """The options left at -1 take their task's value. The calculator task learns from scratch
    (300 steps of Shakespeare first left it copying almost no result right) and needs more steps
    than reversal (with the tool, 700 got 100% and 74% for seeds 1337 and 7; 1000 got 95.5% and 99.5%)."""
    calculator = "calculator" in cfg.tasks.split(",") and not cfg.data
    return replace(cfg, base_iters=cfg.base_iters if cfg.base_iters != -1 else 0 if calculator else 300,
                   max_iters=cfg.max_iters if cfg.max_iters != -1 else 1000 if calculator else 700)


def check_config(cfg: SFTConfig):
    """Every option, before any work (common.check_options for the numbers)."""
    common.check_options(cfg, positive=("batch_size", "grad_accum", "max_iters", "log_interval", "eval_interval",
                                        "lora_r", "n_train", "n_test", "base_layer", "base_head", "base_embd",
                                        "base_block"),
                         non_negative=("warmup_iters", "eval_iters", "block_size", "base_iters"))
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NanoError(f"--val_fraction must be in [0, 1) (got {cfg.val_fraction})")
    if not (0.0 <= cfg.dropout < 1.0 and 0.0 <= cfg.lora_dropout < 1.0):
        raise NanoError("--dropout and --lora_dropout must be in [0, 1)")
    if cfg.chat_init not in ("gaussian", "mean"):
        raise NanoError(f"--chat_init must be gaussian or mean (got {cfg.chat_init!r})")
    if cfg.base_arch not in ("gpt2", "llama"):
        raise NanoError(f"--base_arch must be gpt2 or llama (got {cfg.base_arch!r})")
    unknown = set(cfg.tasks.split(",")) - set(TASKS) - {"calculator"}
    if unknown:
        raise NanoError(f"unknown task {min(unknown)!r} in --tasks (choose from {', '.join(TASKS)})")
    if cfg.data and not cfg.init_from:
        raise NanoError("--data needs --init_from (a checkpoint, a gpt2 name or a Hugging Face folder)")
    common.check_out_dir(cfg.out_dir)


def set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # attention's dropout_p
            m.dropout = p


def prepare_model(model, spec, cfg, tool_tokens=False):
    """The chat tokenizer / template for the model, the embedding grown, LoRA or QLoRA
    applied. tool_tokens: the data calls tools, so a new chat tokenizer gets <|tool_call|> and
    <|tool_result|> too ("chat:tools:" spec). Returns (model, tok, template, trainable params)."""
    template = HFChatTemplate.find(spec)
    tok = load_tokenizer(spec)
    if template is None and not isinstance(tok, ChatTokenizer):
        tok = ChatTokenizer(tok, tools=tool_tokens)
        add_chat_tokens(model, tok, cfg.chat_init, cfg.seed)
    if template is None and tool_tokens and not tok.tools:
        raise NanoError(f"the model's chat tokenizer {tok.spec[:40]!r} has no tool tokens (finetune its base "
                        "model, not a \"chat:\" checkpoint, on conversations with tool calls)")
    if tok.vocab_size > model.config.vocab_size:
        raise NanoError(f"tokenizer {tok.spec[:40]!r} has {tok.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size} (a checkpoint with another tokenizer?)")
    set_dropout(model, cfg.dropout)
    if cfg.lora or cfg.qlora:
        if cfg.qlora:
            import qlora_nf4  # only QLoRA needs it (and Triton on GPUs)

            qlora_nf4.quantize_model(model)
        names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        targets = None if cfg.lora_targets == "auto" else names  # None: lora.default_targets
        try:
            lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
        except ValueError as e:
            raise NanoError(f"{e} (check --lora_targets)") from None
        if isinstance(tok, ChatTokenizer):  # new tokens need trained rows, the old ones stay frozen
            for w in {id(w): w for w in (model.transformer.wte.weight, model.lm_head.weight)}.values():
                train_only_rows(w, tok.base.vocab_size, tok.vocab_size)
    return model, tok, template, [p for p in model.parameters() if p.requires_grad]


def export_model(model, cfg, init_from):
    """A plain GPT for gpt.save_checkpoint: the model itself, or a merged copy of a LoRA
    model. QLoRA merges into the full-precision base, reloaded (rounding the merged weight to
    NF4 again would lose most of the update)."""
    if not (cfg.lora or cfg.qlora):
        return model
    if not cfg.qlora:
        return lora.merge_lora(copy.deepcopy(model))
    full, spec, _ = finetune.load_base(init_from, "cpu", dtype=None)
    prepare_model(full, spec, replace(cfg, lora=True, qlora=False))  # the same growth, LoRA on float weights
    own = dict(full.named_parameters())
    with torch.no_grad():  # what QLoRA trained: the adapters and (tied) the embedding's chat rows
        for name, p in model.named_parameters():
            if ".lora_" in name or name in ("transformer.wte.weight", "lm_head.weight"):
                own[name].copy_(p)
    return lora.merge_lora(full)


@torch.no_grad()
def evaluate(model, examples, cfg, block_size, device, dtype):
    """Token-weighted mean loss over the held-out conversations (all, or eval_iters batches)."""
    model.eval()
    total, count = 0.0, 0
    for k, batch in enumerate(make_batches(examples, range(len(examples)), cfg.batch_size, block_size, cfg.pack)):
        if cfg.eval_iters and k == cfg.eval_iters:
            break
        batch = to_device(batch, device)
        n = int((batch["targets"] != -1).sum())
        with common.autocast(device, dtype):
            total += batch_loss(model, batch).item() * n
        count += n
    model.train()
    return total / max(count, 1)


def train(model, params, train_ex, val_ex, cfg, block_size, device, dtype, metrics_path, save=None, name="sft"):
    """The loop: packed (or padded) batches, token-weighted gradient accumulation, AdamW with
    warmup + cosine, clipping, eval loss, progress lines, metrics.jsonl, checkpoints via save(it)."""
    device_type = device.split(":")[0]
    # gpt.py's groups: matrices decay, biases, norms and the chat rows under LoRA (no_weight_decay) do not
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = make_batches(train_ex, shuffled_forever(len(train_ex), gen), cfg.batch_size, block_size, cfg.pack)
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    with common.MetricsLog(metrics_path, tracker=cfg.tracker, config=asdict(cfg)) as metrics:
        model.train()
        val_loss = evaluate(model, val_ex, cfg, block_size, device, dtype)
        print(f"{name} iter 0: val loss {val_loss:.4f}")
        metrics.log({"iter": 0, "val_loss": val_loss})
        t_start = t_last = time.time()
        tokens = tokens_since = loss_tokens = positions = 0
        for it in range(1, cfg.max_iters + 1):
            lr = common.cosine_lr(it - 1, cfg.learning_rate, min_lr, cfg.warmup_iters, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # token-weighted accumulation: each micro-batch's mean is weighted by its share of
            # the step's target tokens, so the step minimises the mean over all of them
            micro = [to_device(next(stream), device) for _ in range(cfg.grad_accum)]
            counts = [int((b["targets"] != -1).sum()) for b in micro]
            loss_sum = 0.0
            for batch, n in zip(micro, counts):
                with common.autocast(device, dtype):
                    loss = batch_loss(model, batch)
                scaler.scale(loss * n / max(sum(counts), 1)).backward()
                loss_sum += loss.item() * n
                tokens_since += batch["n_tokens"]
                positions += batch["idx"].numel()
            loss_tokens += sum(counts)
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            row = {"iter": it, "train_loss": loss_sum / max(sum(counts), 1), "lr": lr}
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                now = time.time()
                tokens += tokens_since
                row.update(tokens=tokens, tok_per_s=tokens_since / (now - t_last))
                eta = (now - t_start) / it * (cfg.max_iters - it)
                print(f"{name} iter {it}/{cfg.max_iters}: loss {row['train_loss']:.4f}, lr {lr:.2e}, "
                      f"{row['tok_per_s']:,.0f} tok/s, {100 * loss_tokens / positions:.0f}% of positions carry loss, "
                      f"eta {eta / 60:.1f} min")
                t_last, tokens_since = now, 0
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                row["val_loss"] = val_loss = evaluate(model, val_ex, cfg, block_size, device, dtype)
                print(f"{name} iter {it}: val loss {val_loss:.4f}")
                if save is not None:
                    save(it, val_loss)
            metrics.log(row)
    return val_loss


def base_block(cfg):
    """The built-in base's block: --base_block, at least 128 for the calculator's conversations."""
    return max(cfg.base_block, 128) if "calculator" in cfg.tasks.split(",") else cfg.base_block


def builtin_base(cfg, device, dtype, out_dir):
    """out_dir/base.pt: a character-level GPT pretrained on Tiny Shakespeare, trained here
    (the same loop, every token a target) unless it exists already (the name tells the block,
    the architecture and the iterations apart from the default's)."""
    block, iters = base_block(cfg), cfg.base_iters
    name = ("base" + ("" if block == cfg.base_block else f"-{block}") + ("" if cfg.base_arch == "gpt2" else f"-{cfg.base_arch}")
            + ("" if iters == 300 else f"-{iters}it"))
    path = out_dir / f"{name}.pt"
    if path.is_file():
        print(f"base model: {path} (delete it to pretrain again)")
        return str(path)
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    tok = tokenizer.load_tokenizer("char:" + "".join(sorted(set(text) | set("0123456789") | set('{}"*+_'))))
    make = gpt.llama_config if cfg.base_arch == "llama" else gpt.GPTConfig
    config = make(block_size=block, vocab_size=tok.vocab_size, n_layer=cfg.base_layer,
                  n_head=cfg.base_head, n_embd=cfg.base_embd, dropout=0.0)
    model = gpt.GPT(config).to(device)
    train_ex, val_ex = shakespeare_examples(tok, block)
    pre = replace(cfg, max_iters=iters, learning_rate=3e-3, min_lr_ratio=0.1, batch_size=32,
                  grad_accum=1, warmup_iters=50, weight_decay=0.0, eval_iters=8, eval_interval=max(iters, 1),
                  pack=True)
    print(f"pretraining the base: {model.num_params() / 1e6:.2f}M parameters on Tiny Shakespeare "
          f"({pre.max_iters} iters of {pre.batch_size} x {block} characters)")
    if pre.max_iters:
        train(model, list(model.parameters()), train_ex, val_ex, pre, block, device, dtype,
              out_dir / "base_metrics.jsonl", name="pretrain")
    gpt.save_checkpoint(path, model, tok.spec, step=pre.max_iters)
    return str(path)


@common.cli
def main(argv=None):
    cfg = task_defaults(common.parse_config(SFTConfig, argv, __doc__))
    check_config(cfg)
    rows = read_conversations(cfg.data) if cfg.data else None  # every row checked before any model loads
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    common.set_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    init_from = cfg.init_from or builtin_base(cfg, device, dtype, out_dir)
    model, spec, _ = finetune.load_base(init_from, device, dtype=None)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise NanoError(f"--block_size {block_size} exceeds the model's {model.config.block_size} (lower it)")
    calculator_tests = None
    if rows is None:  # the built-in task
        rows, val_rows, tests, calculator_tests = builtin_rows(cfg)
    else:
        random.Random(cfg.seed).shuffle(rows)
        n_val = int(len(rows) * cfg.val_fraction)
        rows, val_rows, tests = rows[n_val:], rows[:n_val] or rows, None
    calls_tools = any(m["role"] == "tool" or m.get("tool_calls") for _, messages in rows for m in messages)
    model, tok, template, params = prepare_model(model, spec, cfg, tool_tokens=calls_tools)
    train_ex, truncated, dropped = encode_conversations(rows, tok, template, block_size)
    val_ex, _, _ = encode_conversations(val_rows, tok, template, block_size)
    if not train_ex or not val_ex:
        raise NanoError(f"no conversation has an assistant token within block_size {block_size} "
                        "(raise --block_size or shorten the conversations)")
    n_targets = sum(sum(t != -1 for t in y) for _, y in train_ex)
    n_tokens = sum(len(x) for x, _ in train_ex)
    print(f"data: {len(train_ex)} train / {len(val_ex)} held-out conversations, {n_tokens:,} tokens, "
          f"{100 * n_targets / n_tokens:.0f}% of them assistant tokens (loss); {truncated} cut to "
          f"block_size {block_size}, {dropped} dropped (no assistant token left)")
    ids, mask = render_conversation(rows[0][1], tok, template=template)
    print(f"{rows[0][0]} rendered (1 = carries loss{', first 48 tokens' if len(ids) > 48 else ''}):\n"
          + show_mask(ids[:48], mask[:48], tok))
    trainable = sum(p.numel() for p in params)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {trainable:,} trainable"
          + (" (LoRA)" if cfg.lora else " (QLoRA)" if cfg.qlora else "") + f"; device {device}")

    if tests:
        before, answers = exact_match(model, tok, tests, template)
        print(f"exact match before SFT: {100 * before:.1f}% on {len(tests)} held-out prompts "
              f"(e.g. {tests[0][0]!r} -> {answers[0]!r}, want {tests[0][1]!r})")

    ckpt_path = out_dir / "ckpt.pt"

    def save(it, val_loss):
        gpt.save_checkpoint(ckpt_path, export_model(model, cfg, init_from), tok.spec, step=it,
                            val_loss=val_loss, sft_config=asdict(cfg), base=init_from)

    val_loss = train(model, params, train_ex, val_ex, cfg, block_size, device, dtype,
                     out_dir / "metrics.jsonl", save)
    print(f"saved {ckpt_path} (tokenizer {tok.spec[:24]!r}...; val loss {val_loss:.4f})")
    result = {"val_loss": val_loss, "ckpt": str(ckpt_path), "seconds": time.time() - t0}
    if tests:
        after, answers = exact_match(model, tok, tests, template)
        print(f"exact match after SFT: {100 * after:.1f}% (before {100 * before:.1f}%) on {len(tests)} held-out "
              f"prompts (e.g. {tests[0][0]!r} -> {answers[0]!r}); {result['seconds']:.0f} s in all")
        result.update(accuracy_before=before, accuracy_after=after)
    print(f"peak memory: {common.peak_memory_mib(device):,.0f} MiB")
    if calculator_tests:  # last: the agent loop with the real calculator, then the same model without it
        with_tool, without, called = calculator_exact_match(model, tok, calculator_tests)
        result.update(with_tool=with_tool, without_tool=without, called_tool=called)
        print(f"calculator task, {len(calculator_tests)} held-out questions (e.g. {calculator_tests[0][0]!r}): "
              f"{100 * called:.0f}% called the tool; without it the same model answers under the system "
              f"message {NO_TOOLS!r}")
        print(f"exact match with the tool: {100 * with_tool:.1f}% without: {100 * without:.1f}%")
    return result


if __name__ == "__main__":
    main()
