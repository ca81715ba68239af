"""The layout DESIGN.md draws, checked: who imports whom (every import, lazy ones too), no
cycle, the line caps of the core files, no function over 60 lines in them, and no test that
reaches into another file's private names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {p.stem: p for p in ROOT.glob("*.py")}
BASE = {"common", "tokenizer", "data", "hf_io", "gpt"}  # what any script may import
# The idea each file builds on, beyond BASE (DESIGN.md's import graph). Deviations, said in the
# README: sft -> sample (its greedy answers are sample.generate), sft -> qlora_nf4 (lazily, for
# --qlora, as finetune's QLoRA), train -> sample (lazily, the lines it prints at the end), sample ->
# quantize (lazily, to run a quantize.py checkpoint: serve and eval_harness load through sample);
# reward -> dpo (the same preference rows), sft (its built-in task's SFT model and loop);
# distill/scaling_laws/interp/rl -> plot for their pictures.
ALLOWED = {
    "common": set(), "bpe": set(), "plot": {"common"},
    "tokenizer": {"common", "bpe", "unigram"}, "hf_io": {"common"}, "data": {"common", "tokenizer"},
    "gpt": {"common", "hf_io", "flash_attention"}, "flash_attention": {"common"},
    "openai_api": {"common", "tools"},
    "lora": BASE, "finetune": BASE | {"lora", "qlora_nf4"},
    "qlora_nf4": BASE | {"finetune", "lora"}, "dpo": BASE | {"finetune", "lora"},
    "sft": BASE | {"finetune", "lora", "qlora_nf4", "sample", "tools"}, "reward": BASE | {"finetune", "lora", "dpo", "sft"},
    "rl": BASE | {"sample", "reward", "lora", "finetune", "plot"},
    "fsdp2_train": BASE | {"lora", "qlora_nf4"}, "quantize": BASE | {"qlora_nf4"},
    "sample": BASE | {"quantize"}, "serve": BASE | {"sample", "openai_api", "kv_blocks", "scheduler", "rag", "tools"},
    "kv_blocks": {"common"}, "scheduler": {"common", "kv_blocks"},
    "export": BASE | {"lora", "bpe", "quantize"}, "eval_harness": BASE | {"sample"}, "eval_hellaswag": BASE | {"quantize"},
    "interp": BASE | {"plot"}, "rag": BASE | {"sample", "finetune"},
    "train": BASE | {"eval_hellaswag", "bpe", "sample"}, "moe": BASE, "distill": BASE | {"plot"},
    "scaling_laws": BASE | {"plot"}, "bert": BASE | {"bpe", "wordpiece", "unigram"}, "tools": {"common"},
    "unigram": set(), "wordpiece": {"bpe"},
}
CAPS = {"gpt.py": 560, "data.py": 300, "lora.py": 300, "bpe.py": 800, "serve.py": 500}
CORE = ("gpt.py", "sample.py", "lora.py", "bpe.py", "serve.py", "train.py")


def imports_of(path: Path) -> set[str]:
    """Every module of ours the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & SCRIPTS.keys()) - {path.stem}


def test_import_graph_is_designs_and_acyclic():
    graph = {name: imports_of(path) for name, path in SCRIPTS.items()}
    unknown = sorted(set(graph) - set(ALLOWED))
    assert not unknown, f"files DESIGN.md's graph does not place: {unknown}"
    extra = {name: sorted(deps - ALLOWED[name]) for name, deps in graph.items() if deps - ALLOWED[name]}
    assert not extra, f"imports outside DESIGN.md's graph: {extra}"
    done, active = set(), []

    def visit(name):  # depth-first: a name met again while still on the path closes a cycle
        assert name not in active, f"import cycle: {' -> '.join(active + [name])}"
        if name not in done:
            active.append(name)
            for dep in graph[name]:
                visit(dep)
            active.pop()
            done.add(name)

    for name in graph:
        visit(name)


def test_line_caps():
    over = {f: n for f, cap in CAPS.items() if (n := len((ROOT / f).read_text().splitlines())) > cap}
    over |= {str(p.relative_to(ROOT)): n for p in (ROOT / "bench").rglob("*.py")
             if (n := len(p.read_text().splitlines())) > 400}
    assert not over, f"over their caps (DESIGN/issue 24): {over}"


def body_lines(fn) -> int:
    """A function's lines, its docstring not counted."""
    n = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


@pytest.mark.parametrize("name", CORE)
def test_no_function_over_60_lines_in_the_core(name):
    tree = ast.parse((ROOT / name).read_text())
    long = {f"{fn.name}:{fn.lineno}": body_lines(fn) for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(fn) > 60}
    assert not long, f"{name}: functions over 60 lines: {long}"


def test_no_test_reaches_a_private_name_of_another_file():
    reached = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name in SCRIPTS}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                reached.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
                reached += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert not reached, reached
