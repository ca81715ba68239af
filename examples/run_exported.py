"""Generate text from a model exported by `python export.py --to torch_export|onnx`, with nothing of
nanollm: only torch (a .pt2) or onnxruntime + numpy (a .onnx).

The exported file holds the model as one step function (export.py's last section):
  step(idx (1, T), input_pos (T,), k_cache, v_cache) -> (logits (1, T, V), k_cache, v_cache)
and, as JSON, the cache shape and the tokenizer (a character alphabet, or a byte-level BPE's token
bytes and merges). Generation is gpt-fast's: one prefill step over the prompt, then one decode step
per new token, the static cache handed from step to step.

Run:
  python export.py --ckpt out/ckpt.pt --to torch_export out/model.pt2
  python examples/run_exported.py out/model.pt2 --prompt "ROMEO:" --tokens 200
  python examples/run_exported.py out/model.onnx --prompt "ROMEO:" --temperature 0.8
"""

import argparse
import json
import re
import sys

# GPT-2's pre-tokenizer split with the standard library's re ([^\W\d_] is a letter, \d a digit)
PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def fail(message):
    """nanollm's convention: one `error:` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Tokenizer:
    """The exported tokenizer: characters, or byte-level BPE (merge the lowest-ranked pair first)."""

    def __init__(self, spec: dict):
        self.kind, self.eot_id = spec["kind"], spec.get("eot_id")
        if self.kind == "char":
            self.alphabet = spec["alphabet"]
            return
        self.vocab = [bytes.fromhex(t) for t in spec["vocab"]]
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.ranks = {(bytes.fromhex(a), bytes.fromhex(b)): r for r, (a, b) in enumerate(spec["merges"])}

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            missing = sorted(set(text) - set(self.alphabet))
            if missing:
                fail(f"{missing[0]!r} is not in the model's alphabet (change --prompt)")
            return [self.alphabet.index(ch) for ch in text]
        ids = []
        for piece in PATTERN.findall(text):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                rank, i = min((self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == float("inf"):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [self.ids[p] for p in parts]
        return ids

    def decode(self, ids) -> str:
        if self.kind == "char":
            return "".join(self.alphabet[i] for i in ids)
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def load_torch(path):
    """(step, empty cache, meta) of a .pt2: torch.export's prefill and decode programs, run as modules."""
    import torch
    from torch.export.pt2_archive._package import load_pt2

    contents = load_pt2(path)
    prefill, decode = (contents.exported_programs[name].module() for name in ("prefill", "decode"))
    meta = json.loads(contents.extra_files["nanollm.json"])
    shape = (meta["n_layer"], 1, meta["n_kv_head"], meta["block_size"], meta["head_dim"])

    def step(ids, start, cache):
        program = decode if len(ids) == 1 else prefill
        with torch.no_grad():
            logits, k, v = program(torch.tensor([ids]), torch.arange(start, start + len(ids)), *cache)
        return logits[0], (k, v)

    return step, (torch.zeros(shape), torch.zeros(shape)), meta


def load_onnx(path):
    """(step, empty cache, meta) of a .onnx: one onnxruntime session for prefill and decode."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["nanollm"])
    shape = (meta["n_layer"], 1, meta["n_kv_head"], meta["block_size"], meta["head_dim"])

    def step(ids, start, cache):
        logits, k, v = session.run(None, {"idx": np.array([ids], dtype=np.int64),
                                          "input_pos": np.arange(start, start + len(ids), dtype=np.int64),
                                          "k_cache": cache[0], "v_cache": cache[1]})
        return logits[0], (k, v)

    return step, (np.zeros(shape, np.float32), np.zeros(shape, np.float32)), meta


def load(path):
    """(step, empty cache, meta); step(ids, start, cache) -> (logits (T, V) of ids at start.., cache)."""
    return load_onnx(path) if str(path).endswith(".onnx") else load_torch(path)


def generate(step, cache, meta, prompt_ids, max_new_tokens, temperature=0.0, seed=0):
    """Prefill the prompt, then one decode step per token: greedy at temperature 0, else sampled."""
    import math
    import random

    rng, ids = random.Random(seed), list(prompt_ids)
    if not 1 <= len(ids) < meta["block_size"]:
        fail(f"the prompt has {len(ids)} tokens; it needs 1 to {meta['block_size'] - 1}")
    logits, cache = step(ids, 0, cache)
    logits = logits[-1].tolist()
    for _ in range(min(max_new_tokens, meta["block_size"] - len(ids))):
        if temperature <= 0:
            nxt = max(range(len(logits)), key=logits.__getitem__)
        else:
            top = max(logits)
            nxt = rng.choices(range(len(logits)), [math.exp((x - top) / temperature) for x in logits])[0]
        ids.append(nxt)
        if nxt == meta["tokenizer"].get("eot_id") or len(ids) == meta["block_size"]:
            break
        logits, cache = step([nxt], len(ids) - 1, cache)
        logits = logits[-1].tolist()
    return ids[len(prompt_ids):]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a .pt2 (torch_export) or .onnx file from export.py")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    step, cache, meta = load(args.path)
    tok = Tokenizer(meta["tokenizer"])
    out = generate(step, cache, meta, tok.encode(args.prompt), args.tokens, args.temperature, args.seed)
    text = args.prompt + tok.decode(out)
    sys.stdout.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
