"""llama: the Llama family in gpt.py. A ~1B bf16 sharded load (gpt.load_pretrained vs transformers,
each in a fresh process: bench/children/load.py), SmolLM2-135M-shaped batch-1 decode vs
transformers and vs the memory bound, GQA's KV bytes per token, 8B/70B QLoRA memory on paper.

Run: python -m bench llama [--quick]   (BENCH_TMP=DIR: where the ~2.5 GB of shards are written)"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hf_io
import gpt
import sample
from common import median_ms

from .util import bound_products, row, run_child


# (hidden, layers, heads, kv heads, intermediate, vocab, tied, rope theta)
LLAMA_3_2_1B = (2048, 16, 32, 8, 8192, 128256, True, 500000.0)
SMOLLM2_135M = (576, 30, 9, 3, 1536, 49152, True, 100000.0)
LLAMA_3_8B = (4096, 32, 32, 8, 14336, 128256, False, 500000.0)
LLAMA_3_70B = (8192, 80, 64, 8, 28672, 128256, False, 500000.0)


def llama_config(shape, block_size=2048):
    hidden, layers, heads, kv, inter, vocab, tied, theta = shape
    return gpt.llama_config(block_size=block_size, vocab_size=vocab, n_layer=layers, n_head=heads, n_kv_head=kv,
                            n_embd=hidden, mlp_hidden=inter, tie_embeddings=tied, rope_theta=theta, norm_eps=1e-5)


def hf_llama_config(shape, transformers, block_size=2048):
    hidden, layers, heads, kv, inter, vocab, tied, theta = shape
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                    max_position_embeddings=block_size, rms_norm_eps=1e-5, rope_theta=theta,
                                    tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def write_random_shards(config, folder: Path, shard_bytes=512 << 20) -> int:
    """Random bf16 weights of config as Hugging Face's sharded safetensors (+ index, config.json);
    one tensor at a time, so writing needs about one shard of memory. Returns the bf16 bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {hf_io.to_hf_name(k, "llama"): tuple(p.shape) for k, p in gpt.empty_model(config).named_parameters()}
    shards, current, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(0, 0.02) if len(shape) == 2 else t.fill_(1.0)
        current[name], size = t, size + t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        hf_io.write_safetensors(folder / fname, shard)
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    hidden, layers, heads, kv, inter, vocab, tied, theta = config_shape(config)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied, "rope_theta": theta,
        "rms_norm_eps": 1e-5, "max_position_embeddings": config.block_size, "hidden_act": "silu",
        "torch_dtype": "bfloat16"}))
    return total


def config_shape(c):
    return (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.mlp_hidden, c.vocab_size, c.tie_embeddings, c.rope_theta)


def load_in_fresh_process(who, folder):
    return json.loads(run_child("load", who, folder))


def bench_load(quick):
    try:
        import transformers  # noqa: F401
        peers = ("ours", "hf")
    except ImportError:
        peers = ("ours",)
    shape = (256, 2, 4, 2, 512, 4096, True, 500000.0) if quick else LLAMA_3_2_1B
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        nbytes = write_random_shards(llama_config(shape), Path(tmp), shard_bytes=(1 << 20) if quick else 512 << 20)
        name = f"{nbytes / 2 / 1e9:.2f}B-param Llama, bf16, {len(list(Path(tmp).glob('*.safetensors')))} shards"
        row("llama", f"write {name}", f"{time.perf_counter() - t0:.1f} s")
        runs = {who: [] for who in peers}
        for _ in range(2 if quick else 3):  # interleaved: ours, hf, ours, hf, ...
            for who in peers:
                runs[who].append(load_in_fresh_process(who, tmp))
        for who in peers:
            wall = statistics.median(r["wall"] for r in runs[who])
            peak = statistics.median(r["peak_kib"] for r in runs[who]) * 1024
            base = statistics.median(r["base_kib"] for r in runs[who]) * 1024
            label = "gpt.load_pretrained" if who == "ours" else "transformers from_pretrained"
            row("llama", f"load {label}: wall", f"{wall:.2f} s")
            row("llama", f"load {label}: peak RSS / bf16 bytes (goal <= 1.3x)",
                f"{peak / nbytes:.2f}x ({peak / 2**30:.2f} GiB; imports before loading {base / 2**30:.2f} GiB, "
                f"load alone {(peak - base) / nbytes:.2f}x)")
        if len(peers) == 2:
            ratio = statistics.median(r["wall"] for r in runs["hf"]) / statistics.median(r["wall"] for r in runs["ours"])
            row("llama", "load wall: transformers / ours", f"{ratio:.2f}x")


def bench_decode(quick):
    torch.manual_seed(0)
    shape = (64, 2, 4, 2, 128, 512, True, 100000.0) if quick else SMOLLM2_135M
    prompt_len, new_tokens, repeat = (8, 16, 2) if quick else (32, 256, 3)
    model = gpt.GPT(llama_config(shape)).eval()
    with torch.no_grad():
        for p in model.parameters():  # std 0.02 gives near-uniform logits: make greedy tokens vary
            p.normal_(0, 0.1) if p.dim() == 2 else None
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, shape[5], (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def ours():
        out = []
        for tok in sample.generate(model, prompt, new_tokens, temperature=0):
            out.append(int(tok))
            if len(out) == 1:
                t_first = time.perf_counter()
        return time.perf_counter() - t_first, out

    try:
        import transformers
        hf = transformers.LlamaForCausalLM(hf_llama_config(shape, transformers)).eval()
        hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    except ImportError:
        hf = None
    sample.decode_layout(model)  # as sample.py's CLI does for batch-1 decode on CPU (after HF's copy)

    def theirs():
        # decode time = all new tokens minus one prefill (timed alone: max_new_tokens=1)
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False)
            t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0), out[0, prompt_len:].tolist()

    # the bound: a 1-row fp32 product over as many weights as the model has, in the faster layout
    bound_ms = min(median_ms(product, repeat=5) for product in bound_products(n_params))
    ours(), theirs() if hf is not None else None  # warm-up
    times = {"ours": [], "hf": []}
    for _ in range(repeat):
        s, ours_out = ours()
        times["ours"].append(s)
        if hf is not None:
            s, hf_out = theirs()
            times["hf"].append(s)
    steps = new_tokens - 1
    name = "SmolLM2-135M-shaped" if not quick else "tiny Llama"
    ours_tps = steps / statistics.median(times["ours"])
    row("llama", f"memory bound: 1-row fp32 product over {n_params / 1e6:.0f}M weights", f"{bound_ms:.2f} ms ({1e3 / bound_ms:.1f} tok/s)")
    row("llama", f"{name} B=1 decode {new_tokens} tok, sample.generate", f"{ours_tps:.1f} tok/s ({ours_tps * bound_ms / 1e3:.0%} of the bound)")
    if hf is not None:
        hf_tps = steps / statistics.median(times["hf"])
        row("llama", f"{name} B=1 decode, LlamaForCausalLM.generate (same tokens: {ours_out == hf_out})",
            f"{hf_tps:.1f} tok/s ({hf_tps * bound_ms / 1e3:.0%} of the bound)")
        row("llama", f"{name} B=1 decode: ours / transformers", f"{ours_tps / hf_tps:.2f}x")


def bench_kv_and_paper():
    smol = llama_config(SMOLLM2_135M)
    gqa, full = sample.kv_bytes_per_token(smol, torch.bfloat16), sample.kv_bytes_per_token(smol, torch.bfloat16, smol.n_head)
    row("llama", "SmolLM2-135M KV cache per token, bf16: GQA (3 kv heads) / full (9)",
        f"{gqa:,} / {full:,} bytes ({full / gqa:.0f}x; 8192 tokens: {gqa * 8192 / 2**20:.0f} vs {full * 8192 / 2**20:.0f} MiB)")

    nf4_bytes = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax

    def shapes(shape):
        hidden, layers, heads, kv, inter, vocab, tied, _ = shape
        hd = hidden // heads
        proj = [(hidden, heads * hd), (hidden, kv * hd), (hidden, kv * hd), (heads * hd, hidden),
                (hidden, inter), (hidden, inter), (inter, hidden)]  # q k v o gate up down: (in, out)
        linear = layers * sum(i * o for i, o in proj)
        embed = vocab * hidden * (1 if tied else 2)
        norms = (2 * layers + 1) * hidden
        return proj, layers, linear, embed, norms

    for label, shape, r in (("Llama-3-8B", LLAMA_3_8B, 16), ("Llama-3-70B", LLAMA_3_70B, 16)):
        proj, layers, linear, embed, norms = shapes(shape)
        lora = layers * sum(r * (i + o) for i, o in proj)
        frozen = linear * nf4_bytes + (embed + norms) * 2  # NF4 linears; embedding, head, norms bf16
        train = lora * (4 + 4 + 8)  # fp32 adapter weights, gradients, Adam's two moments
        if label == "Llama-3-8B":
            row("llama", f"{label} QLoRA r={r}, on paper: NF4 linears + bf16 embed/head",
                f"{frozen / 2**30:.1f} GiB frozen (bf16: {(linear + embed + norms) * 2 / 2**30:.1f} GiB) "
                f"+ {train / 2**30:.2f} GiB LoRA params/grads/Adam ({lora / 1e6:.0f}M)")
        else:
            row("llama", f"{label} FSDP2+QLoRA r={r} on 8 GPUs, on paper, per GPU",
                f"{frozen / 8 / 2**30:.1f} GiB frozen + {train / 8 / 2**30:.2f} GiB LoRA params/grads/Adam "
                f"(whole model {frozen / 2**30:.1f} GiB; activations and the gathered layer not counted)")


def bench_llama(quick: bool) -> None:
    """The Llama family: ~1B bf16 sharded load vs transformers, SmolLM2-135M-shaped batch-1
    decode vs transformers and vs the memory bound, GQA KV bytes, 8B/70B QLoRA memory on paper."""
    bench_kv_and_paper()
    bench_decode(quick)
    bench_load(quick)
