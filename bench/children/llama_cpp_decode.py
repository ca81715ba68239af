"""bench quant's child: llama-cpp-python decoding a GGUF file greedily, timed per token.
Run by bench/quant.py with the interpreter of a virtualenv that has llama-cpp-python:
  python bench/children/llama_cpp_decode.py '{"path": ..., "prompt": [...], "n_new": 64, "threads": 2, "rounds": 3, "n_ctx": 256}'

Weights are not repacked ("use_extra_bufts": false, llama.cpp's --no-repack): on this CPU (AMX_INT8)
the repack puts Q8_0/Q4_0/Q4_K weights into ggml's AMX buffer, and ggml_backend_amx_mul_mat ends the
process with signal 11 on the first product, also on files gguf-py writes itself
(ggml-org/llama.cpp#20824, open). "repack": true in the arguments turns it back on.
(This file is not named llama_cpp.py: run as a script, it would import itself instead of the package.)
"""
import json
import sys
import time

import llama_cpp

args = json.loads(sys.argv[1])
default_params = llama_cpp.llama_cpp.llama_model_default_params


def model_params():
    params = default_params()
    params.use_extra_bufts = bool(args.get("repack", False))
    return params


llama_cpp.llama_cpp.llama_model_default_params = model_params  # where Llama() takes its model params from
llm = llama_cpp.Llama(model_path=args["path"], n_ctx=args["n_ctx"], n_batch=64, n_threads=args["threads"],
                      verbose=False)
out = []
for _ in range(args["rounds"]):
    tokens, stamps = [], []
    for tok in llm.generate(args["prompt"], temp=0.0, top_k=1, reset=True):
        tokens.append(tok)
        stamps.append(time.perf_counter())
        if len(tokens) == args["n_new"]:
            break
    out.append({"tokens": tokens, "decode_s": stamps[-1] - stamps[0]})
print(json.dumps(out))
