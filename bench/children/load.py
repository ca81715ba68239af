"""Wall time and peak RSS of loading a sharded bf16 Llama folder, with gpt.load_pretrained
("ours") or transformers' LlamaForCausalLM.from_pretrained ("hf"), in a fresh process. Prints one
JSON line. Used by `python -m bench llama`.

Run: python -m bench.children.load ours|hf FOLDER"""

import json
import sys
import time

import torch

from bench.util import status_kib

who, folder = sys.argv[1], sys.argv[2]
if who == "ours":
    import gpt
else:
    import transformers


def load():
    if who == "ours":
        return gpt.load_pretrained(folder)[0]
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


open("/proc/self/clear_refs", "w").write("5")  # this process's own peak from here (bench.util.status_kib says why)
base = status_kib("VmRSS")  # the interpreter and the imports
t0 = time.perf_counter()
model = load()
wall = time.perf_counter() - t0
assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
n = sum(p.numel() for p in model.parameters())
print(json.dumps(dict(wall=wall, peak_kib=status_kib("VmHWM"), base_kib=base, params=n)))
