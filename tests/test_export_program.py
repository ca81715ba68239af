"""export.py --to torch_export / --to onnx: the exported step reproduces gpt.GPT's logits (1e-5,
fp32) at prefill and at every decode step, and examples/run_exported.py's greedy tokens (with only
torch, or onnxruntime) are gpt.GPT's greedy tokens, for GPT-2's block and a Llama block (RMSNorm,
RoPE, SwiGLU, GQA). Tracing takes 10-40 s a model here: the Llama block's torch.export runs by
default, the other three pairs are marked slow."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import export
import gpt
import tokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_exported", ROOT / "examples" / "run_exported.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = {"gpt2": dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
           "llama": dict(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, arch="llama")}
CASES = [pytest.param("llama", "torch_export"), pytest.param("gpt2", "onnx", marks=pytest.mark.slow),
         pytest.param("gpt2", "torch_export", marks=pytest.mark.slow),
         pytest.param("llama", "onnx", marks=pytest.mark.slow)]


def checkpoint(tmp_path, arch, shakespeare_path):
    """A small random model with logits spread wide enough that greedy choices are clear-cut."""
    alphabet = "".join(sorted(set(shakespeare_path.read_text()[:20_000])))
    fields = dict(CONFIGS[arch], vocab_size=len(alphabet))
    config = gpt.llama_config(**{k: v for k, v in fields.items() if k != "arch"}) if arch == "llama" else gpt.GPTConfig(**fields)
    torch.manual_seed(0)
    model = gpt.GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(path, model, "char:" + alphabet)
    return path, model, alphabet


def greedy(model, ids, n):
    """The reference: gpt.GPT over the whole sequence each step (no cache), argmax."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids


@pytest.mark.parametrize("arch,fmt", CASES)
def test_exported_step_matches_gpt(tmp_path, shakespeare_path, capsys, arch, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    ckpt, model, alphabet = checkpoint(tmp_path, arch, shakespeare_path)
    out = tmp_path / ("model.pt2" if fmt == "torch_export" else "model.onnx")
    export.main(["--ckpt", str(ckpt), "--to", fmt, str(out)])
    step, cache, meta = runner.load(out)

    prompt = tokenizer.load_tokenizer("char:" + alphabet).encode("ROMEO:\nWhat")
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0][0]
    logits, cache = step(prompt, 0, cache)  # prefill: every position's logits
    torch.testing.assert_close(torch.as_tensor(logits), ref, atol=1e-5, rtol=1e-5)
    ids = list(prompt)
    for nxt in greedy(model, prompt, 6)[len(prompt):]:  # decode steps through the static cache
        ids.append(nxt)
        logits, cache = step([nxt], len(ids) - 1, cache)
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0][0, -1:]
        torch.testing.assert_close(torch.as_tensor(logits), ref, atol=1e-5, rtol=1e-5)

    # the runner: greedy tokens as gpt.GPT's, up to the end of the context
    expected = greedy(model, prompt, 12)[len(prompt):]
    capsys.readouterr()
    assert runner.main([str(out), "--prompt", "ROMEO:\nWhat", "--tokens", "12"]) == expected
    assert capsys.readouterr().out == "ROMEO:\nWhat" + "".join(alphabet[i] for i in expected) + "\n"
    step, cache, meta = runner.load(out)
    long = greedy(model, prompt[:1], meta["block_size"] - 1)  # a one-token prompt (decode only) runs to block_size
    assert runner.generate(step, cache, meta, prompt[:1], 40) == long[1:]
    with pytest.raises(SystemExit) as exit_:
        runner.main([str(out), "--prompt", "caf\u00e9"])
    assert exit_.value.code == 2 and "error: '\u00e9' is not in the model's alphabet" in capsys.readouterr().err


def test_runner_bpe_encodes_as_tiktoken(shakespeare_path):
    tok = runner.Tokenizer(export.runner_tokenizer("gpt2"))
    text = shakespeare_path.read_text()[:3000] + " it's 2024, ok?  Fine_name\n\n"
    expected = tokenizer.load_tokenizer("gpt2").encode(text)
    assert tok.encode(text) == expected and tok.decode(expected) == text and tok.eot_id == 50256


def test_export_refuses_in_one_line(tmp_path, shakespeare_path, monkeypatch):
    import moe

    ckpt, model, alphabet = checkpoint(tmp_path, "gpt2", shakespeare_path)
    moe_model = moe.MoEGPT(model.config, moe.MoEConfig(n_experts=2, top_k=1))
    moe.save_moe_checkpoint(tmp_path / "moe.pt", moe_model, "char:" + alphabet)
    with pytest.raises(SystemExit, match=r"error: .*moe.pt is a mixture-of-experts model"):
        export.main(["--ckpt", str(tmp_path / "moe.pt"), "--to", "torch_export", str(tmp_path / "moe.pt2")])
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"^error: --to onnx needs the onnxscript package \(pip install onnx onnxscript\)$"):
        export.main(["--ckpt", str(ckpt), "--to", "onnx", str(tmp_path / "m.onnx")])
    (tmp_path / "m.pt2").write_text("x")
    with pytest.raises(SystemExit, match=r"error: .*m.pt2 exists and is not empty \(pass --force"):
        export.main(["--ckpt", str(ckpt), "--to", "torch_export", str(tmp_path / "m.pt2")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.pt2", "moe.pt"]
