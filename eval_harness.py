"""Any lm-evaluation-harness task on a nanollm checkpoint, and bits per byte of a text.

EleutherAI's lm-evaluation-harness (Gao et al. 2021; Biderman et al. 2024, "Lessons from the
Trenches on Reproducible Evaluation of Language Models", arXiv:2405.14782) reduces every one
of its benchmarks to three kinds of requests to a model:
- loglikelihood(context, continuation) -> (log p(continuation | context), whether greedy
  decoding would produce exactly the continuation): multiple choice (HellaSwag, ARC, PIQA,
  MMLU) scores each choice this way; acc picks the highest, acc_norm the highest per byte;
- loglikelihood_rolling(text) -> log p(text): whole documents for perplexity and bits per
  byte, cut into windows of the model's context, every token predicted exactly once with
  as much context before it as fits;
- generate_until(context, {"until": [...], "max_gen_toks": n}) -> text: generation tasks.
The harness owns prompts, few-shot examples, metrics and their stderr; a model is a class
with these three methods. `NanoLM` implements them over gpt.GPT, registered as "nanollm".

Batching: requests are sorted longest first, so the first batch is the largest (an
out-of-memory shows at once) and a batch holds rows of similar length (little padding);
each batch is right-padded (causal attention: no real token sees a pad) and scored in one
forward pass, the head applied only at the scored positions. Generation uses sample.py's
KV-cached prefill + decode, one batch of left-padded prompts at a time.

Bits per byte: -log2 p(text) / (UTF-8 bytes of the text). Loss per token depends on how
much text a token covers, so models with different tokenizers (characters, GPT-2 BPE, an
own BPE) only compare per byte.

lm-eval is an optional dependency, imported here only (pip install lm-eval); bits per byte
needs nothing beyond torch.

Run:
  python eval_harness.py --ckpt out/ckpt.pt                    # bits per byte on Tiny Shakespeare val
  python eval_harness.py --ckpt out/ckpt.pt --tasks hellaswag,arc_easy --limit 200
  python eval_harness.py --init_from gpt2 --tasks piqa,mmlu --output_path out/eval.json
From Python: import eval_harness, then lm_eval.simple_evaluate(model="nanollm",
  model_args="ckpt=out/ckpt.pt", tasks=["hellaswag"])
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
import data
import gpt
import sample
from tokenizer import load_tokenizer
from common import NanoError, cli, parse_config

try:  # optional: without lm-eval, NanoLM is not registered and --tasks says how to install it
    import lm_eval.models  # noqa: F401 (lm-eval fills its model registry only while it is empty:
    from lm_eval.api.model import (
        TemplateLM,  # registering "nanollm" first would hide "hf" & co)
    )
    from lm_eval.api.registry import register_model
except ImportError:
    TemplateLM, register_model = object, None


# ----------------------------------------------------------------------------------------
# The three requests over gpt.GPT (plain functions: bits per byte needs no lm-eval)


@torch.no_grad()
def loglikelihood_tokens(model, pairs, batch_size=16, dtype=torch.float32) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) for each (context tokens, continuation
    tokens) pair; the context holds at least one token. A row longer than block_size + 1
    loses tokens on the left, as lm-eval's `hf` model does."""
    block = model.config.block_size
    device = model.transformer.wte.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))  # longest first
    results = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(block + 1):] for i in batch]
        n_scored = [min(len(pairs[i][1]), len(row) - 1) for i, row in zip(batch, rows)]
        T = max(len(row) for row in rows) - 1
        inputs = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: never attended to
        targets = torch.zeros(len(rows), T, dtype=torch.long)
        scored = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (row, n) in enumerate(zip(rows, n_scored)):
            inputs[b, :len(row) - 1] = torch.tensor(row[:-1])
            targets[b, :len(row) - 1] = torch.tensor(row[1:])
            scored[b, len(row) - 1 - n:len(row) - 1] = True  # the continuation's positions
        inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
        with common.autocast(str(device), dtype):
            hidden = model.hidden_states(inputs)  # (B, T, C)
            logits = model.lm_head(hidden[scored]).float()  # (N, V): only the N scored positions
        wanted = targets[scored]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, wanted[:, None])[:, 0]  # (N,)
        missed = (logits.argmax(-1) != wanted).float()
        row_of = scored.nonzero()[:, 0]  # row-major, the same order as hidden[scored]
        sums = torch.zeros(len(rows), device=device).index_add_(0, row_of, token_logprobs)
        misses = torch.zeros(len(rows), device=device).index_add_(0, row_of, missed)
        for b, i in enumerate(batch):
            results[i] = (sums[b].item(), misses[b].item() == 0)
    return results


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict every token once (lm-eval's
    get_rolling_token_windows with context_len=1, made disjoint): the first window follows
    the prefix token, each later one predicts the next max_len tokens (the last one fewer)
    and is conditioned on the tokens right before them, so every window fills the context."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    pairs, predicted = [([prefix_token], tokens[:first])], first
    while predicted < len(tokens):
        end = min(len(tokens), predicted + max_len)
        pairs.append((tokens[end - max_len - 1:predicted], tokens[predicted:end]))
        predicted = end
    return pairs


def loglikelihood_rolling(model, documents: list[list[int]], prefix_token: int, batch_size=16,
                          dtype=torch.float32) -> list[float]:
    """log p(document) of each token list, all windows of all documents in shared batches."""
    windows, owner = [], []
    for d, tokens in enumerate(documents):
        for pair in rolling_windows(tokens, prefix_token, model.config.block_size):
            windows.append(pair)
            owner.append(d)
    totals = [0.0] * len(documents)
    for d, (logprob, _) in zip(owner, loglikelihood_tokens(model, windows, batch_size, dtype)):
        totals[d] += logprob
    return totals


def generate_until(model, tokenizer, contexts: list[list[int]], until: list[str], max_gen_toks: int,
                   temperature=0.0, top_k=None, top_p=None, seed=1337, batch_size=16) -> list[str]:
    """Continue each context (left-truncated to leave room for max_gen_toks) and cut the text
    at the first stop string; a batch stops decoding once every row has hit one."""
    block = model.config.block_size
    contexts = [ctx[-max(1, block - max_gen_toks):] for ctx in contexts]
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # longest first
    texts = [""] * len(contexts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        generated = [[] for _ in batch]
        done = [False] * len(batch)
        for step in sample.generate(model, [contexts[i] for i in batch], max_gen_toks, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, vocab_size=tokenizer.vocab_size):
            for b, t in enumerate(step.tolist()):
                if not done[b]:
                    generated[b].append(t)
                    done[b] = any(s in tokenizer.decode(generated[b]) for s in until)
            if all(done):
                break
        for b, i in enumerate(batch):
            text = tokenizer.decode(generated[b])
            for s in until:
                text = text.split(s)[0]
            texts[i] = text
    return texts


def prefix_token_id(tokenizer) -> int:
    """What an empty context is conditioned on: the end-of-text token (lm-eval's choice); a
    character tokenizer has none, so a newline (documents in its text begin after one)."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    return tokenizer.encode("\n")[0] if "\n" in getattr(tokenizer, "alphabet", "") else 0


def bits_per_byte(model, tokenizer, text: str, batch_size=16, dtype=torch.float32) -> dict:
    """Bits per UTF-8 byte of `text` (one document, rolling windows) and nats per token."""
    tokens = tokenizer.encode(text)
    (logprob,) = loglikelihood_rolling(model, [tokens], prefix_token_id(tokenizer), batch_size, dtype)
    n_bytes = len(text.encode("utf-8"))
    return {"bits_per_byte": -logprob / math.log(2) / n_bytes, "nats_per_token": -logprob / len(tokens),
            "tokens": len(tokens), "bytes": n_bytes, "bytes_per_token": n_bytes / len(tokens)}


# ----------------------------------------------------------------------------------------
# lm-eval's model interface


def load_model(ckpt="", init_from="", device="cpu"):
    """(model in eval mode, tokenizer) from a checkpoint, or a GPT-2 name / Hugging Face
    folder / hub name (gpt.load_pretrained, with the folder's tokenizer); a quantize.py checkpoint
    runs on its own kernels."""
    model, spec = sample.load_source(init_from or ckpt, device, None, checkpoint=not init_from)  # quantized too
    return model.eval(), load_tokenizer(spec)


class NanoLM(TemplateLM):
    """lm-eval's model interface over a gpt.GPT. TemplateLM splits (context, continuation)
    strings into tokens exactly as lm-eval's own `hf` model does (trailing spaces of the
    context move to the continuation; the pair is encoded whole, then split), so scores
    compare with any model the harness runs."""

    def __init__(self, ckpt="out/ckpt.pt", init_from="", device="auto", dtype="auto", batch_size=16,
                 max_batch_size=None, seed=1337, model=None, tokenizer=None):
        if TemplateLM is object:
            raise NanoError("eval_harness.py needs lm-eval for --tasks (pip install lm-eval)")
        super().__init__()
        device = common.pick_device(device)
        self.dtype = common.pick_dtype(device, dtype)
        if model is None:
            model, tokenizer = load_model(ckpt, init_from, device)
        self.model, self.tokenizer_ = model, tokenizer
        self._device = device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.seed = int(seed)

    @property
    def eot_token_id(self):
        return prefix_token_id(self.tokenizer_)

    @property
    def max_length(self):
        return self.model.config.block_size

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer_.encode(string)  # nanollm's tokenizers add no BOS

    def tok_decode(self, tokens, **kwargs):
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        # requests: ((context, continuation) strings, context tokens, continuation tokens)
        results = loglikelihood_tokens(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                       self.batch_size, self.dtype)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        documents = [self.tok_encode(req.args[0]) for req in requests]
        results = loglikelihood_rolling(self.model, documents, self.eot_token_id, self.batch_size, self.dtype)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), result)
        return results

    def generate_until(self, requests, disable_tqdm=False):
        # requests with the same generation settings are generated together
        groups = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts = [None] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if self.tokenizer_.eot_id is not None:
                until.append(self.tok_decode([self.tokenizer_.eot_id]))  # as lm-eval's hf: stop at end of text
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            out = generate_until(self.model, self.tokenizer_, [self.tok_encode(requests[i].args[0]) for i in members],
                                 until, int(kwargs.pop("max_gen_toks", 256)), temperature, kwargs.pop("top_k", None),
                                 kwargs.pop("top_p", None), self.seed, self.batch_size)
            for i, text in zip(members, out):
                texts[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return texts

    def get_model_info(self):
        c = self.model.config
        return {"model_num_parameters": self.model.num_params(non_embedding=False),
                "model_dtype": str(self.dtype), "model_config": {k: getattr(c, k) for k in vars(c)}}


if register_model is not None:
    register_model("nanollm")(NanoLM)


def run_tasks(lm, tasks: list[str], include_path="", num_fewshot=None, limit=None, seed=1234) -> dict:
    """lm_eval.simple_evaluate on the given model; local task folders in include_path are
    searched first (without indexing lm-eval's ~15k built-in tasks when they suffice)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path or None)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise NanoError(f"unknown task(s) {', '.join(unknown)} (see `lm-eval ls tasks`, or pass --include_path)")
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=False, random_seed=seed,
                                       numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # requests' and huggingface_hub's network errors derive from these
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise NanoError(f"the data of {', '.join(tasks)} could not be downloaded ({type(e).__name__}; run once "
                        "with the network to fill the Hugging Face cache, or pass --include_path with a task "
                        "yaml over a local copy)") from None


def bpb_text(option: str) -> str:
    text = shakespeare_val_text() if option == "shakespeare" else data.read_text_file(option, "--bpb_text")
    if not text:
        raise NanoError(f"--bpb_text {option} is empty (pass a text file with some text)")
    return text


# ----------------------------------------------------------------------------------------
# CLI


@dataclass
class HarnessConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint written by train.py (gpt.save_checkpoint)"})
    init_from: str = field(default="", metadata={"help": "gpt2 ... gpt2-xl, a Hugging Face folder or hub name, instead of --ckpt"})
    tasks: str = field(default="", metadata={"help": "comma-separated lm-eval tasks, e.g. hellaswag,arc_easy (needs lm-eval)"})
    limit: int = field(default=0, metadata={"help": "examples per task (0: all)"})
    num_fewshot: int = field(default=-1, metadata={"help": "few-shot examples (-1: each task's default)"})
    include_path: str = field(default="", metadata={"help": "a folder of extra task yamls (lm-eval's --include_path)"})
    bpb_text: str = field(default="shakespeare", metadata={
        "help": "bits per byte of this text file ('shakespeare': the val split of the shipped Tiny Shakespeare; '' to skip)"})
    batch_size: int = field(default=16, metadata={"help": "requests per forward pass"})
    output_path: str = field(default="", metadata={"help": "write the results as JSON here (as lm-eval's --output_path)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "autocast dtype: auto | float32 | bfloat16 | float16"})
    seed: int = field(default=1234, metadata={"help": "seed of few-shot sampling and generation (lm-eval's default)"})


def shakespeare_val_text() -> str:
    """The last 10% of Tiny Shakespeare: the val split data.prepare_dataset makes by default."""
    text = data.SHAKESPEARE_PATH.read_text(encoding="utf-8")
    return text[int(len(text) * 0.9):]


def print_bpb(r: dict, label: str):
    print(f"bits per byte of {label}: {r['bits_per_byte']:.4f} ({r['nats_per_token']:.4f} nats per token, "
          f"{r['tokens']:,} tokens, {r['bytes_per_token']:.2f} bytes per token)")


@cli
def main(argv=None) -> dict:
    cfg = parse_config(HarnessConfig, argv, __doc__)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks and not cfg.bpb_text:
        raise NanoError("nothing to evaluate (pass --tasks and/or --bpb_text)")
    if tasks and TemplateLM is object:
        raise NanoError("--tasks needs lm-eval (pip install lm-eval)")
    if cfg.bpb_text and cfg.bpb_text != "shakespeare" and not Path(cfg.bpb_text).is_file():
        raise NanoError(f"--bpb_text {cfg.bpb_text} not found (a text file, or 'shakespeare')")
    text = bpb_text(cfg.bpb_text) if cfg.bpb_text else ""  # a binary or empty file: one line before any work
    if cfg.output_path and Path(cfg.output_path).is_dir():
        raise NanoError(f"--output_path {cfg.output_path} is a folder (name a .json file in it)")
    for name in ("batch_size",):
        if getattr(cfg, name) <= 0:
            raise NanoError(f"--{name} must be positive (got {getattr(cfg, name)})")
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    model, tokenizer = load_model(cfg.ckpt, cfg.init_from, device)
    results, t0 = {}, time.perf_counter()
    if cfg.bpb_text:
        results["bits_per_byte"] = {cfg.bpb_text: bits_per_byte(model, tokenizer, text, cfg.batch_size, dtype)}
        print_bpb(results["bits_per_byte"][cfg.bpb_text], cfg.bpb_text)
    if tasks:
        from lm_eval.utils import handle_non_serializable, make_table

        lm = NanoLM(device=device, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                    model=model, tokenizer=tokenizer)
        out = run_tasks(lm, tasks, cfg.include_path, None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                        cfg.limit or None, cfg.seed)
        print(make_table(out))
        if "groups" in out:
            print(make_table(out, "groups"))
        results |= json.loads(json.dumps(out, default=handle_non_serializable))
    print(f"evaluated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if cfg.output_path:  # after the results are printed: a write error loses nothing
        path = Path(cfg.output_path)
        common.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False),
                                                             encoding="utf-8"))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
