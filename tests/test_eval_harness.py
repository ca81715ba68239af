"""eval_harness.py: batched loglikelihood == one-forward-per-request reference, rolling windows
== lm-eval's, bits per byte == the model's own loss, generate_until == plain greedy decoding;
lm-eval on local tasks (a yaml over a jsonl, nothing downloaded): our adapter == lm-eval's own
`hf` model on the HF export of the same checkpoint, and HellaSwag == eval_hellaswag.py's
lm_eval style; bad inputs are one-line errors.

Tolerances: a sum of ~10-60 fp32 token log-probabilities, batched and padded vs one row at a
time, or ours vs transformers (same weights): measured ~1e-6, asserted <= 1e-4 absolute; a
whole document's sum (rolling, ~700 tokens, ~960 nats) differs by a few fp32 ulps of the sum
(measured 1.2e-4 = 1.3e-7 relative), so there 1e-6 relative is added. Accuracies and
generated texts are compared exactly."""

import json
import math
import os

import pytest
import torch
from test_eval_hellaswag import ROWS as HELLASWAG_ROWS
from test_export import char_spec, train_tiny

import data
import tokenizer
import eval_harness as eh
import eval_hellaswag as hs
import export
import gpt

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local jsonl tasks only: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def char_model():
    spec = char_spec()
    config = gpt.GPTConfig(block_size=16, vocab_size=len(spec) - 5, n_layer=2, n_head=2, n_embd=32)
    return train_tiny(config, spec, steps=30), tokenizer.load_tokenizer(spec)


def naive_loglikelihood(model, context, continuation):
    """The plain reference: one forward over the row, full log-softmax, sum, argmax check."""
    row = (context + continuation)[-(model.config.block_size + 1):]
    n = min(len(continuation), len(row) - 1)
    with torch.no_grad():
        logits = model(torch.tensor([row[:-1]]))[0][0, -n:]  # the continuation's positions
    targets = torch.tensor(row[-n:])
    logprob = torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
    return logprob, bool((logits.argmax(-1) == targets).all())


@torch.no_grad()
def plain_greedy(model, ids, n):
    """nanoGPT's uncached loop: re-read the last block_size tokens for every new token."""
    idx = torch.tensor([ids])
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size:])[0][:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(ids):].tolist()


def test_loglikelihood_batched_equals_naive(char_model):
    model, tok = char_model
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n_ctx, n_cont in [(1, 1), (3, 5), (10, 2), (16, 1), (5, 12), (30, 4), (2, 20), (7, 7), (1, 16)]:
        ids = torch.randint(0, tok.vocab_size, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((ids[:n_ctx], ids[n_ctx:]))  # rows up to 34 tokens: the longer ones lose their left
    context = tok.encode("ROMEO:\nWhat")
    greedy = plain_greedy(model, context, 6)
    pairs.append((context, greedy))  # the model's own greedy continuation: is_greedy must say so
    reference = [naive_loglikelihood(model, c, x) for c, x in pairs]
    assert reference[-1][1] and not all(r[1] for r in reference)
    for batch_size in (1, 4, 64):
        ours = eh.loglikelihood_tokens(model, pairs, batch_size)
        assert [g for _, g in ours] == [g for _, g in reference]
        assert max(abs(a - b) for (a, _), (b, _) in zip(ours, reference)) <= 1e-4


def test_rolling_windows_equal_lm_eval():
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval defines the windows (requirements-dev)")
    for max_len in (1, 4, 16):
        for n in (0, 1, 3, 4, 5, 16, 17, 33, 50):
            tokens = list(range(100, 100 + n))
            theirs = [utils.make_disjoint_window(w)
                      for w in utils.get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=max_len, context_len=1)]
            ours = eh.rolling_windows(tokens, 7, max_len)
            assert ours == [(list(a), list(b)) for a, b in theirs]
            assert [t for _, cont in ours for t in cont] == tokens  # every token predicted once


def test_bits_per_byte_equals_the_models_loss(char_model):
    model, tok = char_model
    # shorter than the context: one window after the prefix token, the model's own mean loss
    text = "ROMEO:\nO, she "
    ids = [eh.prefix_token_id(tok)] + tok.encode(text)
    with torch.no_grad():
        loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[1].item()
    r = eh.bits_per_byte(model, tok, text)
    assert math.isclose(r["bits_per_byte"], loss * len(text) / math.log(2) / len(text.encode()), rel_tol=1e-5)
    # longer: windows of block_size, each prediction with as much context as fits
    text = data.SHAKESPEARE_PATH.read_text()[:203]
    ids = tok.encode(text)
    windows = eh.rolling_windows(ids, eh.prefix_token_id(tok), model.config.block_size)
    total = sum(naive_loglikelihood(model, c, x)[0] for c, x in windows)
    r = eh.bits_per_byte(model, tok, text, batch_size=5)
    assert math.isclose(r["bits_per_byte"], -total / math.log(2) / len(text.encode()), rel_tol=1e-5)
    assert r["tokens"] == len(ids) == 203 and r["bytes_per_token"] == 1.0


def test_generate_until_equals_plain_greedy(char_model):
    model, tok = char_model
    prompts = ["ROMEO:\n", "First Citizen:\nBefore we", "MENENIUS", "Is it not "]
    until = ["e", "\n"]
    ours = eh.generate_until(model, tok, [tok.encode(p) for p in prompts], until, max_gen_toks=10, batch_size=3)
    expected = []
    for p in prompts:  # nanoGPT's uncached loop, one prompt at a time
        ids = tok.encode(p)
        text = tok.decode(plain_greedy(model, ids, 10))
        for s in until:
            text = text.split(s)[0]
        expected.append(text)
    assert ours == expected
    assert any(len(t) < 10 for t in ours) and any(len(t) == 10 for t in ours)  # cut and uncut rows


# ----------------------------------------------------------------------------------------
# lm-eval: local tasks, our adapter vs lm-eval's own hf model


def write_tasks(folder, hellaswag_yaml):
    """Four local tasks, one per request type: multiple choice, HellaSwag's own yaml over
    local rows, a rolling-loglikelihood (bits per byte) task and a generation task."""
    folder.mkdir()
    shakespeare = data.SHAKESPEARE_PATH.read_text()
    mc = [{"question": "The capital of France is", "choices": ["Paris", "London", "a banana", "blue"], "label": 0},
          {"question": "ROMEO: O, she doth teach the torches to", "choices": ["burn bright!", "swim.", "be"], "label": 0},
          {"question": "Water boils at  ", "choices": ["100 degrees", " three o'clock", "the station"], "label": 1},
          {"question": "Café 日本 👋", "choices": ["x", "yy y", "zzz\n"], "label": 2}]
    docs = [{"text": shakespeare[i:i + n]} for i, n in [(0, 300), (5000, 40), (9000, 700)]]  # 700 chars: rolling windows
    gen = [{"prompt": shakespeare[i:i + 30], "answer": shakespeare[i + 30:i + 40]} for i in (100, 2000, 4000)]
    files = {"mc": mc, "hs": HELLASWAG_ROWS, "docs": docs, "gen": gen}
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def local(name):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\ntest_split: test\n"

    (folder / "mc.yaml").write_text(
        "task: nano_mc\n" + local("mc") + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: label\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "hs.yaml").write_text(  # lm-eval's hellaswag.yaml (its preprocessing) over our rows
        f"include: {hellaswag_yaml}\ntask: hellaswag_local\ndataset_name: null\ntraining_split: null\n"
        "validation_split: null\n" + local("hs"))
    (folder / "docs.yaml").write_text(
        "task: nano_bpb\n" + local("docs") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: nano_gen\n" + local("gen") + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n', '.']\n  max_gen_toks: 12\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return ["nano_mc", "hellaswag_local", "nano_bpb", "nano_gen"]


def test_lm_eval_ours_equals_hf_model_on_the_export(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the harness (requirements-dev)")
    pytest.importorskip("transformers", reason="lm-eval's hf model needs transformers (requirements-dev)")
    from lm_eval.tasks import TaskManager

    config = gpt.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
    model = train_tiny(config, "gpt2", steps=3)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, "gpt2")
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--to", "hf", str(tmp_path / "hf")])
    hellaswag_yaml = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "hellaswag", "hellaswag.yaml")
    tasks = write_tasks(tmp_path / "tasks", hellaswag_yaml)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)

    def evaluate(name, args):
        return lm_eval.simple_evaluate(model=name, model_args=args, tasks=tasks, task_manager=manager,
                                       log_samples=True, bootstrap_iters=0)

    ours = evaluate("nanollm", f"ckpt={tmp_path / 'ckpt.pt'},device=cpu,batch_size=3")  # the registered name
    theirs = evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu")
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        metrics = [k for k in b if k.endswith(",none") and "stderr" not in k]
        assert metrics, task
        for k in metrics:
            assert math.isclose(a[k], b[k], rel_tol=1e-5), (task, k, a[k], b[k])
        for sa, sb in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                if task == "nano_gen":
                    assert ra == rb  # the same generated text
                else:
                    ra, rb = ra[0], rb[0]
                    (la, lb) = (ra[0], rb[0]) if isinstance(ra, tuple) else (ra, rb)
                    assert abs(la - lb) <= 1e-4 + 1e-6 * abs(lb), (task, ra, rb)
                    if isinstance(ra, tuple):
                        assert ra[1] == rb[1]  # is_greedy
    # HellaSwag through the harness == eval_hellaswag.py's lm_eval style on the same rows
    r = hs.evaluate(model, tokenizer.load_tokenizer("gpt2"), [hs.check_example(row, "row") for row in HELLASWAG_ROWS], "lm_eval")
    assert r["acc"] == ours["results"]["hellaswag_local"]["acc,none"]
    assert r["acc_norm"] == ours["results"]["hellaswag_local"]["acc_norm,none"]


def test_cli_table_json_and_bits_per_byte(char_model, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is the harness (requirements-dev)")
    model, tok = char_model
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, tok.spec)
    (tmp_path / "tasks").mkdir()
    rows = [{"question": "ROMEO: O", "choices": [" she", "x", "zz"], "label": 0},
            {"question": "MENENIUS: ", "choices": ["yes", "no"], "label": 1},
            {"question": "To be", "choices": [" or", ".", "!"], "label": 0}]
    (tmp_path / "tasks" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "mc.yaml").write_text(
        f"task: char_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tasks' / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    text = tmp_path / "val.txt"
    text.write_text(data.SHAKESPEARE_PATH.read_text()[-2000:])
    out = tmp_path / "results.json"
    eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--tasks", "char_mc", "--include_path", str(tmp_path / "tasks"),
             "--limit", "2", "--output_path", str(out), "--device", "cpu", "--bpb_text", str(text)])
    printed = capsys.readouterr().out
    assert "char_mc" in printed and "acc_norm" in printed and "Stderr" in printed  # lm-eval's table
    assert f"bits per byte of {text}" in printed
    results = json.loads(out.read_text())
    assert results["results"]["char_mc"]["sample_len"] == 2 and 0 <= results["results"]["char_mc"]["acc,none"] <= 1
    bpb = results["bits_per_byte"][str(text)]
    expected = eh.bits_per_byte(model, tok, text.read_text())
    assert math.isclose(bpb["bits_per_byte"], expected["bits_per_byte"], rel_tol=1e-6)
    assert bpb["bytes"] == 2000 and bpb["bits_per_byte"] < math.log2(65)  # trained: better than uniform


def test_shakespeare_val_text_is_the_val_split(tmp_path):
    """--bpb_text shakespeare scores exactly the text prepare_dataset holds out as val."""
    folder = data.prepare_dataset("shakespeare_char", data_root=tmp_path)
    val = data.TokenBins(folder, "val").shards[0]
    tok = tokenizer.load_tokenizer(data.read_meta(folder)["tokenizer"])
    assert tok.decode(val.tolist()) == eh.shakespeare_val_text()


def test_bad_inputs(char_model, tmp_path, monkeypatch, capsys):
    model, tok = char_model
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, tok.spec)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"error: .*notes.txt is not a readable checkpoint"):
        eh.main(["--ckpt", str(tmp_path / "notes.txt")])
    with pytest.raises(SystemExit, match=r"error: --bpb_text .*missing.txt not found"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--bpb_text", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match=r"error: nothing to evaluate \(pass --tasks and/or --bpb_text\)"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--bpb_text", ""])
    with pytest.raises(SystemExit, match=r"error: --batch_size must be positive"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--batch_size", "0"])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "empty.txt").write_text("")
    for text, match in (("blob.bin", r"blob.bin is not UTF-8 text \(NUL byte"), ("empty.txt", r"empty.txt is empty")):
        with pytest.raises(SystemExit, match=f"^error: (--bpb_text )?.*{match}"):
            eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--bpb_text", str(tmp_path / text)])
    with pytest.raises(SystemExit, match=r"^error: --output_path .* is a folder \(name a .json file in it\)$"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--output_path", str(tmp_path)])
    # a path that cannot be written (below a file; a read-only folder is the same OSError, but root
    # writes anyway): the results are printed first, then one line
    with pytest.raises(SystemExit, match=r"^error: cannot write .*notes.txt/r.json \(.*; pick a writable path\)$"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--output_path", str(tmp_path / "notes.txt" / "r.json"),
                 "--bpb_text", str(tmp_path / "notes.txt")])
    assert "bits per byte" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "ckpt.pt", "empty.txt", "notes.txt"]
    monkeypatch.setattr(eh, "TemplateLM", object)  # as if lm-eval were not installed
    with pytest.raises(SystemExit, match=r"^error: --tasks needs lm-eval \(pip install lm-eval\)$"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--tasks", "hellaswag"])


@pytest.mark.slow
def test_unknown_task(char_model, tmp_path):
    """Slow: the check indexes lm-eval's ~15k built-in task yamls (~15 s)."""
    pytest.importorskip("lm_eval", reason="lm-eval is the harness (requirements-dev)")
    model, tok = char_model
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, tok.spec)
    with pytest.raises(SystemExit, match=r"error: unknown task\(s\) no_such_task"):
        eh.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--tasks", "no_such_task", "--bpb_text", ""])
