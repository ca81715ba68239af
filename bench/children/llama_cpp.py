"""bench quant's child: llama-cpp-python decoding a GGUF file greedily, timed per token.
Run by bench/quant.py with the interpreter of a virtualenv that has llama-cpp-python:
  python bench/children/llama_cpp.py '{"path": ..., "prompt": [...], "n_new": 64, "threads": 2, "rounds": 3, "n_ctx": 256}'
"""
import json
import sys
import time

import llama_cpp

args = json.loads(sys.argv[1])
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
