"""export: export.py's writers against the reference writers, from a model in memory to files on
disk: Hugging Face folders vs transformers' save_pretrained, GGUF f32/f16/q8_0 vs gguf-py's
GGUFWriter, PEFT adapters vs PeftModel.save_pretrained (time and size).

Run: python -m bench export [--quick]"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import export
import gpt
import lora

from .util import row


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reference_gguf(path, metadata: dict, tensors: list):
    """gguf-py's GGUFWriter (llama.cpp's converter's writer) on the same metadata and tensors,
    quantized by gguf-py's reference quantizers: the same bytes as ours (tests/test_export.py)."""
    import gguf
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.constants import GGUFValueType as V
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(path, arch=metadata["general.architecture"][1])
    for key, (kind, value) in metadata.items():
        if key != "general.architecture":
            if kind == export.ARRAY:
                writer.add_key_value(key, value[1], V(kind), sub_type=V(value[0]))
            else:
                writer.add_key_value(key, value, V(kind))
    for name, t, ggml_type in tensors:
        writer.add_tensor(name, quantize(t.detach().float().numpy(), Q(ggml_type)), raw_dtype=Q(ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bench_export(quick: bool) -> None:
    """export.py on random GPT-2-124M weights (nanollm's shape: vocab padded to 50304, tied
    head) with GPT-2's tokenizer, from the model in memory to files on disk:
    - hf: ours (export_hf: model.safetensors + tokenizer files) vs transformers'
      save_pretrained of the same GPT2LMHeadModel plus its tokenizer's save_pretrained;
    - gguf f32 / f16 / q8_0: ours (export_gguf: metadata with the 50k-token tokenizer,
      tensors converted and quantized in torch) vs gguf-py's GGUFWriter given the same
      metadata and tensors, quantized by gguf-py's numpy reference;
    - peft (an r=8 adapter on c_attn, c_proj, c_fc): ours (export_peft) vs PeftModel.save_pretrained.
    Wall time: median of interleaved repeats (ours, reference, ours, ...), each into a fresh
    path; the ratio is reference time / our time (> 1: ours is faster). Sizes in MiB."""
    torch.manual_seed(0)
    if quick:
        config = gpt.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
        repeats, shape = 1, "tiny"
    else:
        config = gpt.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
        repeats, shape = 3, "124M"
    model = gpt.GPT(config).eval()
    spec = "gpt2"
    export.byte_bpe(spec)  # GPT-2's tokenizer is built once per process (cached): not timed

    import peft
    import transformers

    hf_dir = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        export.export_hf(model, spec, hf_dir)  # the reference side's inputs: the same weights in HF
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        lora.apply_lora(model, r=8, alpha=16)
        adapter = lora.lora_state_dict(model, "gpt2")
        lora.merge_lora(model)  # B = 0: the weights are unchanged
        peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**{
            k: v for k, v in export.peft_config(adapter).items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "task_type")}))
        counter = iter(range(10**6))

        def fresh(suffix=""):
            return hf_dir.parent / f"{hf_dir.name}_{next(counter)}{suffix}"

        def ours_gguf(gguf_type):
            return lambda out: export.export_gguf(model, spec, out, gguf_type, "bench")

        def ref_gguf(gguf_type):
            def run(out):
                ggml_type, file_type = export.GGUF_TYPES[gguf_type]
                metadata = export.gguf_metadata(config, "bench", file_type, 4 * config.n_embd) | export.gguf_tokenizer(
                    spec, config.vocab_size)
                reference_gguf(out, metadata, export.gguf_tensors(model, ggml_type))
            return run

        def mkdir_then(fn):
            def run(out):
                out.mkdir()
                fn(out)
            return run

        cases = [
            ("hf", "", mkdir_then(lambda out: export.export_hf(model, spec, out)),
             lambda out: (hf_model.save_pretrained(out), hf_tok.save_pretrained(out)), "transformers"),
            *[(f"gguf {t}", ".gguf", ours_gguf(t), ref_gguf(t), "gguf-py") for t in ("f32", "f16", "q8_0")],
            ("peft r=8", "", mkdir_then(lambda out: export.export_peft(adapter, out)),
             lambda out: peft_model.save_pretrained(out), "peft"),
        ]
        for label, suffix, ours, reference, who in cases:
            times = {"ours": [], "ref": []}
            sizes = {}
            for _ in range(repeats):
                for side, fn in (("ours", ours), ("ref", reference)):
                    out = fresh(suffix)
                    t0 = time.perf_counter()
                    fn(out)
                    times[side].append(time.perf_counter() - t0)
                    sizes[side] = _size(out)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
            t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
            row("export", f"{shape} {label}: ours / {who}", f"{t_ours:.2f} s / {t_ref:.2f} s "
                f"({t_ref / t_ours:.2f}x), {sizes['ours'] / 2**20:,.1f} / {sizes['ref'] / 2**20:,.1f} MiB")
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
