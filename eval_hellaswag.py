"""HellaSwag: zero-shot commonsense sentence completion as a yardstick for any checkpoint.

HellaSwag (Zellers et al. 2019, "HellaSwag: Can a Machine Really Finish Your Sentence?",
arXiv:1905.07830) gives a context (an ActivityNet video caption or a WikiHow step) and four
endings; one is what really came next, three were written by a language model and kept
because they fool models but not people. A language model answers without any training
on the task: it scores each ending by how likely it finds it after the context and picks
the most likely one. Chance is 25%; people get 95%.

Two ways of scoring are in use, and their numbers differ, so both are reported by name:
- completion style (Karpathy's build-nanogpt and llm.c): context = the `ctx` field as is,
  each ending rendered as " " + ending, loss summed over the ending's tokens only.
  acc: the ending with the lowest summed loss; acc_norm: the lowest mean loss per token.
- lm-eval style (EleutherAI's lm-evaluation-harness task `hellaswag`): the query is
  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) and each choice is
  preprocess(ending), scored as the continuation " " + choice, where preprocess strips,
  turns " [title]" into ". ", deletes the other WikiHow tags like "[step]" and collapses
  double spaces. acc: the highest summed log-likelihood; acc_norm: the highest
  log-likelihood divided by the number of characters of the choice.
The model is the same in both; only the text and the normalisation differ.

Scoring is batched: the four endings of an example are four rows of one padded batch,
several examples share a forward pass, and the head is applied only at the ending
positions (the (rows, T, vocab) logits never exist). `ending_logprobs_naive` is the plain
one-forward-per-ending loop the batched scorer is tested against.

Run:
  python eval_hellaswag.py --init_from gpt2                  # real GPT-2 124M, both styles
  python eval_hellaswag.py --ckpt out/ckpt.pt --limit 500    # a checkpoint of train.py
  torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --init_from gpt2-xl
From Python (train.py's --eval_hellaswag_every):
  evaluate(model, tokenizer, load_examples(download("val")), "completion") -> {"acc", "acc_norm", "n"}
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F

import common
from common import NanoError, cli
import data
import gpt
import hf_io
from tokenizer import load_tokenizer

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
STYLES = ("completion", "lm_eval")
# the fields the two styles read; the files also hold ind, source_id, split and split_type
REQUIRED_FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")


# ----------------------------------------------------------------------------------------
# Rendering: text -> 4 token rows and masks per example


def lm_eval_preprocess(text: str) -> str:
    text = text.strip()
    # the brackets are WikiHow markup left in HellaSwag: a title ends a sentence, other tags go
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def lm_eval_query_and_choices(example: dict) -> tuple[str, list[str]]:
    # capitalize() also lower-cases the rest of ctx_b, exactly as the harness does
    ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()
    query = lm_eval_preprocess(example["activity_label"] + ": " + ctx)
    return query, [lm_eval_preprocess(ending) for ending in example["endings"]]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of context + continuation into tokens: trailing spaces of the
    context move to the continuation, the whole string is encoded once, and the
    continuation is what follows the context's own tokens (BPE merges at the seam would
    otherwise differ from encoding the two parts apart)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_tokens = tokenizer.encode(context)
    return context_tokens, whole[len(context_tokens):]


@dataclass
class Rendered:
    rows: list[list[int]]  # 4 rows: context tokens + ending tokens
    masks: list[list[int]]  # 1 where the row's token belongs to the ending (is scored)
    norms: list[float]  # what acc_norm divides the summed log-likelihood by, per ending
    label: int


def render_example(example: dict, tokenizer, style: str, max_tokens: Optional[int] = None) -> Rendered:
    """Turn one example into 4 token rows with their ending masks. Rows longer than
    max_tokens (the model's block_size + 1: the last token is only a target) lose tokens
    on the left, as the harness does; the ending is kept whole if it fits."""
    if style == "completion":
        context = tokenizer.encode(example["ctx"])
        pairs = [(context, tokenizer.encode(" " + ending)) for ending in example["endings"]]
    elif style == "lm_eval":
        query, choices = lm_eval_query_and_choices(example)
        pairs = [encode_pair(tokenizer, query, " " + choice) for choice in choices]
    else:
        raise NanoError(f"unknown style {style!r} (choose one of {', '.join(STYLES)})")
    rows, masks = [], []
    for context, ending in pairs:
        row, mask = context + ending, [0] * len(context) + [1] * len(ending)
        if max_tokens is not None and len(row) > max_tokens:
            row, mask = row[-max_tokens:], mask[-max_tokens:]
        mask[0] = 0  # the first token of a row has nothing before it to be predicted from
        rows.append(row)
        masks.append(mask)
    if style == "completion":
        norms = [float(sum(mask)) for mask in masks]  # tokens: acc_norm = lowest mean loss
    else:
        norms = [float(len(choice)) for choice in choices]  # characters of the choice, no space
    return Rendered(rows, masks, norms, example["label"])


# ----------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def ending_logprobs(model, rendered: list[Rendered], device, dtype=torch.float32) -> torch.Tensor:
    """Summed log-likelihood of each ending, (E, 4) for E examples, in one forward pass."""
    rows = [row for r in rendered for row in r.rows]  # 4E rows
    masks = [mask for r in rendered for mask in r.masks]
    T = max(len(row) for row in rows) - 1
    # inputs are rows[:-1], targets rows[1:]; right padding is never seen by real tokens
    # (attention is causal) and is never scored (its mask is 0)
    inputs = torch.tensor([row[:-1] + [0] * (T + 1 - len(row)) for row in rows])
    targets = torch.tensor([row[1:] + [0] * (T + 1 - len(row)) for row in rows])
    scored = torch.tensor([mask[1:] + [0] * (T + 1 - len(mask)) for mask in masks], dtype=torch.bool)
    inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
    with common.autocast(str(device), dtype):
        hidden = model.hidden_states(inputs)  # (4E, T, C)
        logits = model.lm_head(hidden[scored])  # (N, V): only the N ending positions
    token_logprobs = -F.cross_entropy(logits.float(), targets[scored], reduction="none")  # (N,)
    row_of_token = scored.nonzero()[:, 0]  # row-major, the same order as hidden[scored]
    sums = torch.zeros(len(rows), device=token_logprobs.device).index_add_(0, row_of_token, token_logprobs)
    return sums.view(len(rendered), 4)


@torch.no_grad()
def ending_logprobs_naive(model, rendered: Rendered, device) -> torch.Tensor:
    """The plain reference: one forward per ending, full logits, log-softmax, sum. (4,)"""
    sums = []
    for row, mask in zip(rendered.rows, rendered.masks):
        tokens = torch.tensor(row, device=device)
        logits, _ = model(tokens[None, :-1])  # (1, T, V): position t predicts token t + 1
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        token_logprobs = logprobs.gather(1, tokens[1:, None])[:, 0]  # (T,)
        sums.append(token_logprobs[torch.tensor(mask[1:], dtype=torch.bool, device=device)].sum())
    return torch.stack(sums).cpu()


def _seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def evaluate(model, tokenizer, examples: list[dict], style: str = "completion", batch_size: int = 16,
             device=None, dtype=torch.float32, progress: bool = False, log_every: int = 20) -> dict:
    """HellaSwag accuracy of `model` on `examples` in one scoring style.

    Returns {"acc", "acc_norm", "n"}. Under torch.distributed each rank scores its share
    (examples[rank::world_size]) and the counts are summed, so every rank returns the
    totals; every rank must call it. Pass the bare model (not the DDP wrapper)."""
    if style not in STYLES:
        raise NanoError(f"unknown style {style!r} (choose one of {', '.join(STYLES)})")
    device = device if device is not None else next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = examples[rank::world]
    max_tokens = model.config.block_size + 1
    was_training = model.training
    model.eval()
    correct = correct_norm = done = 0
    t0 = time.time()
    for start in range(0, len(shard), batch_size):
        batch = shard[start:start + batch_size]
        rendered = []
        for example in batch:
            try:
                rendered.append(render_example(example, tokenizer, style, max_tokens))
            except NanoError as e:  # e.g. a character a char-level model has never seen
                raise NanoError(f"example ind={example.get('ind')}: {str(e).removeprefix('error: ')}") from None
        scores = ending_logprobs(model, rendered, device, dtype).cpu()  # (E, 4)
        norms = torch.tensor([r.norms for r in rendered])
        labels = torch.tensor([r.label for r in rendered])
        # argmax takes the first of equal maxima, as numpy's argmax in the harness
        correct += (scores.argmax(1) == labels).sum().item()
        correct_norm += ((scores / norms).argmax(1) == labels).sum().item()
        done += len(batch)
        step = start // batch_size + 1
        if progress and rank == 0 and (step == 1 or step % log_every == 0 or done == len(shard)):
            elapsed = time.time() - t0
            who = f"rank 0 of {world}: " if world > 1 else ""
            print(f"[{style}] {who}{done}/{len(shard)} acc {correct / done:.4f} acc_norm "
                  f"{correct_norm / done:.4f} | {done / elapsed:.1f} examples/s | "
                  f"ETA {_seconds(elapsed / done * (len(shard) - done))}", flush=True)
    model.train(was_training)
    counts = torch.tensor([correct, correct_norm, done], dtype=torch.long)
    if world > 1:
        counts = counts.to(device)  # nccl reduces cuda tensors, gloo cpu ones
        dist.all_reduce(counts)
        counts = counts.cpu()
    correct, correct_norm, n = (int(c) for c in counts.tolist())
    return {"acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1), "n": n}


# ----------------------------------------------------------------------------------------
# Data: download, read, check


def download(split: str = "val", cache_dir: str = "~/.cache/nanollm/hellaswag") -> Path:
    """Fetch hellaswag_<split>.jsonl into cache_dir once; later calls find it there."""
    if split not in SPLITS:
        raise NanoError(f"unknown split {split!r} (choose one of {', '.join(SPLITS)})")
    path = Path(cache_dir).expanduser() / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    return common.download(DATA_URL.format(split=split), path,
                        hint=f"check the network or pass --data PATH to a local hellaswag_{split}.jsonl")


def check_example(row, where: str) -> dict:
    """Validate one HellaSwag row; `where` names it in the one-line error."""
    if not isinstance(row, dict):
        raise NanoError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row:
            hint = " (the test split is unlabelled: use the val split)" if name == "label" else \
                f" (HellaSwag rows have {', '.join(REQUIRED_FIELDS)})"
            raise NanoError(f"{where}: missing field '{name}'{hint}")
    for name in ("activity_label", "ctx_a", "ctx_b", "ctx"):
        if not isinstance(row[name], str):
            raise NanoError(f"{where}: field '{name}' must be a string")
    if not row["ctx"]:
        raise NanoError(f"{where}: field 'ctx' is empty (an ending needs a context)")
    endings = row["endings"]
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise NanoError(f"{where}: 'endings' must be a list of 4 strings")
    label = row["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the Hugging Face copy stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise NanoError(f"{where}: label {row['label']!r} is outside 0..3")
    return {**row, "label": label}


def load_examples(path, limit: Optional[int] = None) -> list[dict]:
    """Read a HellaSwag jsonl file (one example per line), checking every row it keeps."""
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"{path} not found (pass a HellaSwag .jsonl, or leave --data out to download)")
    examples = []
    for lineno, line in enumerate(data.read_text_file(path, "--data").splitlines(), 1):  # binary: one line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        examples.append(check_example(row, f"{path} line {lineno}"))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise NanoError(f"{path} is empty (expected one HellaSwag example per line)")
    return examples


# ----------------------------------------------------------------------------------------
# CLI


@dataclass
class EvalConfig:
    init_from: Optional[str] = field(default=None, metadata={
        "help": "gpt2 | gpt2-medium | gpt2-large | gpt2-xl: OpenAI's weights (gpt2 if neither this nor --ckpt is given)"})
    ckpt: Optional[str] = field(default=None, metadata={"help": "a nanollm checkpoint, e.g. out/ckpt.pt; its own tokenizer is used"})
    split: str = field(default="val", metadata={"help": "train | val (test has no labels)"})
    data: Optional[str] = field(default=None, metadata={"help": "a local HellaSwag .jsonl instead of downloading --split"})
    cache_dir: str = field(default="~/.cache/nanollm/hellaswag", metadata={"help": "where downloads are kept"})
    style: str = field(default="both", metadata={"help": "completion | lm_eval | both"})
    limit: Optional[int] = field(default=None, metadata={"help": "score only the first N examples"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass (4 rows each)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16 | float16 | auto: float32 is what the published numbers used; bf16 is faster and shifts them slightly"})
    log_every: int = field(default=20, metadata={"help": "print progress every N batches"})
    out_json: Optional[str] = field(default=None, metadata={"help": "also write the results to this JSON file"})


def load_model(cfg: EvalConfig, device: str):
    """(model, tokenizer) from --ckpt or --init_from, with one-line errors."""
    if cfg.ckpt:
        ckpt = gpt.read_checkpoint(cfg.ckpt)
        if "quantization" in ckpt:  # written by quantize.py: its own layers (int8/int4 kernels on CPU)
            import quantize

            model, spec = quantize.load_quantized(ckpt, device)
        else:
            model, spec = gpt.model_from_checkpoint(ckpt, cfg.ckpt).to(device), ckpt["tokenizer"]
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as e:
            reason = str(e) or e.__class__.__name__
            raise NanoError(f"checkpoint {cfg.ckpt}: its tokenizer {spec!r} cannot be loaded ({reason})") from None
    else:
        model, tokenizer = gpt.GPT.from_pretrained(cfg.init_from or "gpt2").to(device), load_tokenizer("gpt2")
    if tokenizer.vocab_size > model.config.vocab_size:  # ids past the embedding would index out of range
        raise NanoError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size} (a checkpoint with another tokenizer?)")
    return model, tokenizer


@cli
def main(argv=None) -> dict:
    cfg = common.parse_config(EvalConfig, argv, __doc__)
    # check the cheap things before any download or model load
    if cfg.ckpt and cfg.init_from:
        raise NanoError("pass either --init_from or --ckpt, not both")
    styles = list(STYLES) if cfg.style == "both" else [cfg.style]
    if any(s not in STYLES for s in styles):
        raise NanoError(f"unknown --style {cfg.style!r} (completion, lm_eval or both)")
    if cfg.batch_size < 1 or cfg.log_every < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise NanoError("--batch_size, --log_every and --limit must be at least 1")
    if cfg.data is None and cfg.split not in ("train", "val"):
        raise NanoError(f"--split {cfg.split!r} has no labels or does not exist (use val or train)")
    known = cfg.init_from in hf_io.GPT2_SIZES or Path(cfg.init_from or ".").is_dir() or "/" in (cfg.init_from or "")
    if cfg.init_from and not known:  # checked before the download, not after it
        raise NanoError(f"unknown model {cfg.init_from!r} ({', '.join(hf_io.GPT2_SIZES)}, a Hugging Face folder "
                        "or a hub name like org/name)")
    if cfg.out_json and (Path(cfg.out_json).is_dir() or not Path(cfg.out_json).parent.is_dir()):
        raise NanoError(f"--out_json {cfg.out_json} is a folder or its folder does not exist (give a file path)")
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)

    # torchrun sets RANK/WORLD_SIZE: split the examples over the processes
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if ddp else 0
    try:
        with common.rank0_first():  # rank 0 downloads, the others then find the files in the cache
            path = Path(cfg.data) if cfg.data else download(cfg.split, cfg.cache_dir)
            model, tokenizer = load_model(cfg, device)
        examples = load_examples(path, cfg.limit)
        if rank == 0:
            name = cfg.ckpt or cfg.init_from or "gpt2"
            print(f"hellaswag: {len(examples)} examples from {path}, model {name}, "
                  f"{device} {str(dtype).removeprefix('torch.')}, "
                  f"{dist.get_world_size() if ddp else 1} process(es)", flush=True)
        results = {}
        for style in styles:
            results[style] = evaluate(model, tokenizer, examples, style, cfg.batch_size, device, dtype,
                                      progress=True, log_every=cfg.log_every)
        if rank == 0:
            for style, r in results.items():
                print(f"hellaswag {style} style: acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} (n={r['n']})")
            if cfg.out_json:  # temp file + rename: a reader never sees half a file
                text = json.dumps({"config": asdict(cfg), **results}, indent=2)
                common.atomic_write(cfg.out_json, lambda tmp: tmp.write_text(text))
        return results
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
