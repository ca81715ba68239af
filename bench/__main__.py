"""Benchmarks: the figures each idea promises, measured, with ratios against baselines.

Every figure is a median of repeated runs (the machine is noisy). Ratios are printed as
`1.83x` and always say what is divided by what.

Run: python -m bench                 # every section but gpu
     python -m bench train loss      # only these sections
     python -m bench --quick         # tiny sizes: a smoke test of the benchmark code itself
     python -m bench gpu             # the CUDA check on a GPU machine (exits non-zero on a failure)
     python -m bench gpu --dry-run   # the same code paths on CPU, as the test suite runs it
`python -m bench --help` lists the sections.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common import NanoError, cli

# name: (module.function under bench/, what it measures). Each function takes quick: bool;
# train and speedrun also take --nanogpt, gpu --dry-run.
SECTIONS = {
    "train": ("train.bench_train", "train.py step time and MFU; GPT-2 vs Llama block; --nanogpt: vs karpathy/nanoGPT"),
    "speedrun": ("speedrun.bench_speedrun", "train.py --preset speedrun vs nanoGPT's CPU run (--nanogpt): time to its "
                                            "loss, the lever table, a picture"),
    "bpb": ("bpb.bench_bpb", "bits per byte of Tiny Shakespeare, one model under four tokenizers"),
    "loss": ("loss.bench_loss", "peak memory of lm_head + cross-entropy, naive vs chunked"),
    "sample": ("sample.bench_sample", "KV-cached decode vs no cache, vs HF generate, vs the memory bound"),
    "bpe": ("bpe.bench_bpe", "bpe.py encode vs tiktoken, training vs HF tokenizers"),
    "encoders": ("encoders.bench_encoders", "BPE / WordPiece / Unigram at one vocab: tokens/byte, longest, GPT bits/byte"),
    "nf4": ("nf4.bench_nf4", "NF4 dequantize: PyTorch, Triton, bitsandbytes; NF4 vs bf16 bytes"),
    "lora": ("lora.bench_lora", "LoRA vs full finetune: trainable params, optimizer state, file, step"),
    "fsdp2": ("fsdp2.bench_fsdp2", "bytes per rank, full vs QLoRA; CPU step time, 2 ranks vs 1"),
    "dpo": ("dpo.bench_dpo", "DPO step memory and time: reference = frozen copy vs adapters off"),
    "moe": ("moe.bench_moe", "MoE dispatch vs a per-expert loop; load balance after a tiny run"),
    "hellaswag": ("hellaswag.bench_hellaswag", "batched HellaSwag scoring vs one forward per ending"),
    "flash": ("flash.bench_flash", "attention forward + backward peak memory and time, naive vs tiled"),
    "serve": ("serve.bench_serve", "continuous batching vs one at a time over HTTP; prefix cache; --vllm: vs vLLM-CPU"),
    "export": ("export.bench_export", "HF, GGUF and PEFT writers vs transformers, gguf-py, peft"),
    "research": ("research.bench_research", "knowledge-distillation loss, chunked vs naive: memory, time"),
    "sft": ("sft.bench_sft", "packed vs padded SFT batches; the built-in task before / after"),
    "llama": ("llama.bench_llama", "Llama: load vs transformers, decode vs bound, GQA KV bytes, QLoRA"),
    "quant": ("quant.bench_quant", "quantize.py: val loss, bytes and batch-1 decode of fp32 ... GPTQ/AWQ-4, vs llama.cpp"),
    "rl": ("rl.bench_rl", "rl.py: GRPO and PPO on the built-in task, where a step's time goes, rollout vs training"),
    "rag": ("rag.bench_rag", "rag.py: IVF vs exact search at 100k vectors, BM25 indexing, the retrieval / reader table"),
    "passkey": ("passkey.bench_passkey", "a key hidden in filler, greedy retrieval at 1-4x the trained length: RoPE vs YaRN/NTK"),
    "gpu": ("gpu.bench_gpu", "the CUDA check: every CUDA figure, then pytest -m gpu (not run by default)"),
}


def section_function(name: str):
    module, function = SECTIONS[name][0].split(".")
    return getattr(importlib.import_module(f"bench.{module}"), function)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sections:\n" + "\n".join(f"  {name:<10} {what}"
                                                                      for name, (_, what) in SECTIONS.items()))
    parser.add_argument("sections", nargs="*", help="sections to run (default: every section but gpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark code itself")
    parser.add_argument("--dry-run", action="store_true", help="with gpu: check every import and path on CPU")
    parser.add_argument("--nanogpt", default="", help="train, speedrun: a karpathy/nanoGPT checkout to run side by side "
                                                      "with train.py (default: none, that part is skipped)")
    parser.add_argument("--vllm", default="", help="serve: the python of a virtualenv with vllm-cpu, to run side "
                                                    "by side with serve.py (default: none, that part is skipped)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.sections or [name for name in SECTIONS if name != "gpu"]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise NanoError(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    print(f"{'section':<10} {'what':<62} figure")
    for name in names:
        if name == "gpu":
            section_function(name)(args.quick, args.dry_run)
        elif name == "serve":
            section_function(name)(args.quick, args.vllm)
        elif name in ("train", "speedrun"):
            section_function(name)(args.quick, args.nanogpt)
        else:
            section_function(name)(args.quick)


if __name__ == "__main__":
    main()
