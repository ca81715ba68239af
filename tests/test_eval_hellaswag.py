"""eval_hellaswag.py: rendering, lm-eval preprocessing, batched == naive scoring, a model
that memorised the right endings scores 1.0, DDP totals == 1 process, bad inputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common import NanoError
import torch
import torch.multiprocessing as mp

import eval_hellaswag as hs
import gpt
import tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Rows in the real HellaSwag jsonl format. The first is val row ind 24 as published (the
# example in build-nanogpt's hellaswag.py); the others are written for the tests: WikiHow
# tags ([header], [title], [step], [substeps]), unicode, a triple space, an upper-case
# ctx_b word that capitalize() lowers, an empty ctx_b.
ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "label": 3, "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain"},
    {"ind": 101, "activity_label": "Food and Entertaining",
     "ctx_a": "[header] How to make crème brûlée [title] Heat the cream. [step] Pour the cream into a saucepan.",
     "ctx_b": "",
     "ctx": "[header] How to make crème brûlée [title] Heat the cream. [step] Pour the cream into a saucepan.",
     "endings": ["[substeps] Warm it over medium heat until it steams.",
                 "[title] Freeze the sugar overnight.  Then serve it cold.",
                 "Throw the saucepan away.", "[step] Paint the ramekins blue."],
     "label": 0, "source_id": "wikihow~12345", "split": "val", "split_type": "zeroshot"},
    {"ind": 102, "activity_label": "Playing accordion", "ctx_a": "A woman in a café holds an accordion.",
     "ctx_b": "she then PLAYS", "ctx": "A woman in a café holds an accordion. she then PLAYS",
     "endings": ["a slow waltz for the crowd.", "the drums   with her feet.",
                 "a song about the sea, smiling.", "nothing and leaves the café."],
     "label": 2, "source_id": "activitynet~v_abc", "split": "val", "split_type": "indomain"},
    {"ind": 103, "activity_label": "Health", "ctx_a": "[header] How to sleep better [title] Keep a schedule.",
     "ctx_b": "", "ctx": "[header] How to sleep better [title] Keep a schedule.",
     "endings": ["[step] Go to bed at the same time each night.", "[step] Drink coffee at midnight.",
                 "[title] Sleep on the roof.", "[step] Sing loudly at 3 a.m."],
     "label": 0, "source_id": "wikihow~678", "split": "val", "split_type": "zeroshot"},
    {"ind": 104, "activity_label": "Skiing", "ctx_a": "A skier glides down a snowy slope.",
     "ctx_b": "the skier", "ctx": "A skier glides down a snowy slope. the skier",
     "endings": ["eats a sandwich upside down.", "reads a newspaper mid-air.",
                 "turns sharply and stops near the lift.", "paints the snow green."],
     "label": 2, "source_id": "activitynet~v_xyz", "split": "val", "split_type": "zeroshot"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_path(tmp_path):
    return write_jsonl(tmp_path / "hellaswag_val.jsonl", ROWS)


@pytest.fixture
def gpt2_tok():
    return tokenizer.load_tokenizer("gpt2")


def char_tokenizer():
    texts = []
    for row in ROWS:
        query, choices = hs.lm_eval_query_and_choices(row)
        texts += [row["ctx"], query] + row["endings"] + choices
    return tokenizer.load_tokenizer("char:" + "".join(sorted(set(" ".join(texts)))))


def tiny_gpt(vocab_size, block_size=64, seed=0):
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    return gpt.GPT(cfg).eval()


# ---- rendering ---------------------------------------------------------------------------


def test_render_completion_style_hand_checked(gpt2_tok):
    r = hs.render_example(ROWS[0], gpt2_tok, "completion")
    # "A| man| is| sitting| on| a| roof|.| he" then " " + ending, e.g. " starts| pulling| up| roof|ing|..."
    ctx = [32, 582, 318, 5586, 319, 257, 9753, 13, 339]
    endings = [[318, 1262, 14441, 284, 14441, 257, 5166, 286, 1341, 271, 13],  # is using wrap ... sk|is|.
               [318, 34759, 1241, 19867, 572, 13],  # is ripping level tiles off.
               [318, 4769, 257, 6437, 1134, 338, 23441, 13],  # is holding a rub|ik|'s cube.
               [4940, 10427, 510, 9753, 278, 319, 257, 9753, 13]]  # starts pulling up roof|ing on a roof.
    assert r.rows == [ctx + e for e in endings]
    assert r.masks == [[0] * 9 + [1] * len(e) for e in endings]
    assert r.norms == [11.0, 6.0, 8.0, 9.0]  # tokens: acc_norm is the mean loss per token
    assert r.label == 3


def test_render_lm_eval_style_hand_checked(gpt2_tok):
    r = hs.render_example(ROWS[0], gpt2_tok, "lm_eval")
    # "Roof shingle removal: A man is sitting on a roof. He" (capitalised ctx_b)
    query = [15450, 1659, 427, 17697, 9934, 25, 317, 582, 318, 5586, 319, 257, 9753, 13, 679]
    assert r.rows[1] == query + [318, 34759, 1241, 19867, 572, 13]
    assert r.masks[1] == [0] * 15 + [1] * 6
    assert r.norms == [float(len(e)) for e in ROWS[0]["endings"]]  # characters, without the space
    assert r.norms[1] == 27.0


def test_render_truncates_on_the_left(gpt2_tok):
    full = hs.render_example(ROWS[0], gpt2_tok, "completion")
    cut = hs.render_example(ROWS[0], gpt2_tok, "completion", max_tokens=12)
    for row, mask, cut_row, cut_mask in zip(full.rows, full.masks, cut.rows, cut.masks):
        assert cut_row == row[-12:] and len(cut_mask) == 12
        assert cut_mask[0] == 0 and cut_mask[1:] == mask[-11:]  # the first token has no prediction
    assert cut.norms == [11.0, 6.0, 8.0, 9.0]  # ending 0 (11 tokens) just fits after 1 context token


def test_lm_eval_preprocessing_matches_hand_written_strings():
    query, choices = hs.lm_eval_query_and_choices(ROWS[1])
    # " [title]" -> ". ", other tags deleted, double spaces collapsed once
    assert query == "Food and Entertaining: How to make crème brûlée. Heat the cream. Pour the cream into a saucepan."
    # the harness strips before deleting tags, so a leading tag leaves a leading space
    assert choices == [" Warm it over medium heat until it steams.", " Freeze the sugar overnight. Then serve it cold.",
                       "Throw the saucepan away.", " Paint the ramekins blue."]
    query, choices = hs.lm_eval_query_and_choices(ROWS[2])
    assert query == "Playing accordion: A woman in a café holds an accordion. She then plays"  # capitalize() lowers
    assert choices[1] == "the drums  with her feet."  # "   " -> "  ": one non-overlapping pass
    # acc_norm divides by characters (str length), not UTF-8 bytes: "café." is 5, not 6
    r = hs.render_example(ROWS[2], tokenizer.load_tokenizer("gpt2"), "lm_eval")
    assert choices[3] == "nothing and leaves the café." and r.norms[3] == 28.0
    query, _ = hs.lm_eval_query_and_choices(ROWS[3])
    assert query == "Health: How to sleep better. Keep a schedule."


def test_encode_pair_moves_trailing_space_to_continuation(gpt2_tok):
    ctx, cont = hs.encode_pair(gpt2_tok, "on a roof. ", "he")
    assert ctx == gpt2_tok.encode("on a roof.") and cont == gpt2_tok.encode(" he")


# ---- scoring -----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer,style,block_size", [
    ("gpt2", "lm_eval", 64), ("char", "completion", 160), ("char", "lm_eval", 40)])  # 40: rows get cut
def test_batched_equals_one_forward_per_ending(gpt2_tok, tokenizer, style, block_size):
    tok = gpt2_tok if tokenizer == "gpt2" else char_tokenizer()
    model = tiny_gpt(50304 if tokenizer == "gpt2" else tok.vocab_size, block_size)
    rendered = [hs.render_example(r, tok, style, block_size + 1) for r in ROWS]
    batched = hs.ending_logprobs(model, rendered, "cpu")  # all 20 rows in one padded forward
    naive = torch.stack([hs.ending_logprobs_naive(model, r, "cpu") for r in rendered])
    # fp32 sums of 5-110 log-probs: padding changes the matmul shapes, so the two differ
    # by rounding only (~1e-6 relative); 1e-4 absolute is far below the gaps between endings
    torch.testing.assert_close(batched, naive, rtol=1e-5, atol=1e-4)
    assert (batched.max(1).values - batched.min(1).values).min() > 1e-2  # no near-ties to hide behind

    norms = torch.tensor([r.norms for r in rendered])
    labels = torch.tensor([r.label for r in rendered])
    model.train()
    got = hs.evaluate(model, tok, [hs.check_example(r, "row") for r in ROWS], style, batch_size=2)
    assert model.training  # evaluate() hands the model back in the mode it came in
    assert got == {"acc": (naive.argmax(1) == labels).sum().item() / 5,
                   "acc_norm": ((naive / norms).argmax(1) == labels).sum().item() / 5, "n": 5}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny char-level GPT trained to memorise context + right ending in both styles."""
    tok = char_tokenizer()
    texts = []
    for row in ROWS:
        query, choices = hs.lm_eval_query_and_choices(row)
        texts.append(row["ctx"] + " " + row["endings"][row["label"]])
        texts.append(query + " " + choices[row["label"]])
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=1, n_head=4, n_embd=32))
    x = torch.tensor([r + [0] * (T + 1 - len(r)) for r in rows])[:, :-1]
    y = torch.tensor([r[1:] + [-1] * (T + 1 - len(r)) for r in rows])  # -1: padding, not a target
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):  # ~1.4 s of CPU; the loss ends near 0.01 nats per character
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    gpt.save_checkpoint(path, model, tok.spec)
    return model.eval(), tok, path


def test_memorised_model_scores_one(memorised, data_path):
    model, tok, ckpt = memorised
    examples = hs.load_examples(data_path)
    for style in hs.STYLES:
        assert hs.evaluate(model, tok, examples, style, batch_size=3) == {"acc": 1.0, "acc_norm": 1.0, "n": 5}
    # the CLI path: --ckpt with its own char tokenizer, --limit, results JSON
    out = data_path.parent / "results.json"
    results = hs.main(["--ckpt", str(ckpt), "--data", str(data_path), "--device", "cpu",
                       "--limit", "4", "--out_json", str(out)])
    assert results == {s: {"acc": 1.0, "acc_norm": 1.0, "n": 4} for s in hs.STYLES}
    assert json.loads(out.read_text())["lm_eval"]["n"] == 4



@pytest.mark.parametrize("method", ["absmax", "rtn"])
def test_quantized_checkpoint_scores_like_its_model(memorised, data_path, method):
    """A quantize.py checkpoint (int8 absmax; RTN 4-bit at group 32) loads through --ckpt and gets
    the accuracies its own model gets through evaluate() (offline: the example file is local)."""
    import quantize

    model, tok, ckpt = memorised
    out = data_path.parent / f"ckpt-{method}.pt"
    quantize.main(["--ckpt", str(ckpt), "--method", method, "--group_size", "32", "--out", str(out)])
    qmodel, spec = quantize.load_quantized(out)
    assert isinstance(qmodel.transformer.h[0].mlp.c_fc, quantize.QuantLinear) and spec == tok.spec
    examples = hs.load_examples(data_path)
    expected = {s: hs.evaluate(qmodel, tok, examples, s, batch_size=3) for s in hs.STYLES}
    results = hs.main(["--ckpt", str(out), "--data", str(data_path), "--device", "cpu"])
    assert results == expected and results["completion"]["n"] == 5
    assert results["completion"]["acc"] >= 0.8  # the memorised answers survive quantization

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world, port, args):
    # what torchrun would set; fork keeps the parent's imports, so a rank starts in ms
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hs.main(args)


@pytest.fixture
def random_ckpt(tmp_path):
    # a random model, so the counts are neither all right nor all wrong
    tok = char_tokenizer()
    ckpt = tmp_path / "random.pt"
    gpt.save_checkpoint(ckpt, tiny_gpt(tok.vocab_size, 128, seed=3), tok.spec)
    return ckpt


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path, data_path, random_ckpt, loopback):
    args = ["--ckpt", str(random_ckpt), "--data", str(data_path), "--device", "cpu", "--batch_size", "2"]
    single = hs.main(args)
    out = tmp_path / "ddp.json"
    mp.start_processes(_ddp_rank, args=(2, free_port(), args + ["--out_json", str(out)]), nprocs=2,
                       start_method="fork")
    ddp = json.loads(out.read_text())  # written by rank 0 from the all-reduced counts
    for style in hs.STYLES:
        assert ddp[style] == single[style] and ddp[style]["n"] == 5
    scores = {r[k] for r in single.values() for k in ("acc", "acc_norm")}
    assert scores - {0.0, 1.0}  # some count strictly between none and all, that a wrong split would change


@pytest.mark.slow
def test_torchrun_cli(tmp_path, data_path, random_ckpt, loopback):
    """The real launch: torchrun --standalone, 2 gloo ranks, 5 examples split 3 + 2."""
    args = ["--ckpt", str(random_ckpt), "--data", str(data_path), "--device", "cpu", "--batch_size", "2"]
    single = hs.main(args)
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "eval_hellaswag.py"), *args, "--out_json", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 of 2: 3/3" in proc.stdout
    ddp = json.loads(out.read_text())
    assert all(ddp[style] == single[style] for style in hs.STYLES)


# ---- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (lambda r: r.pop("endings"), "line 2: missing field 'endings'"),
    (lambda r: r.pop("label"), "line 2: missing field 'label' (the test split is unlabelled"),
    (lambda r: r.update(label=4), "line 2: label 4 is outside 0..3"),
    (lambda r: r.update(label="x"), "line 2: label 'x' is outside 0..3"),
    (lambda r: r.update(endings=["a", "b", "c"]), "line 2: 'endings' must be a list of 4 strings"),
])
def test_bad_rows_name_the_line(tmp_path, change, message):
    rows = [dict(r) for r in ROWS[:3]]
    change(rows[1])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(NanoError, match="^") as e:
        hs.load_examples(path)
    assert f"{path} {message}" in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(NanoError, match=f"{empty} is empty"):
        hs.load_examples(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(NanoError, match=f"{broken} line 2: not valid JSON"):
        hs.load_examples(broken)
    with pytest.raises(NanoError, match="not found"):
        hs.load_examples(tmp_path / "missing.jsonl")
    for name, raw, match in (("bin.jsonl", b"\x00\x01PK", "NUL byte at offset 0"),
                             ("latin1.jsonl", "caf\xe9".encode("latin-1"), "bad byte at offset 3")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(NanoError, match=f"{name} is not UTF-8 text \\({match}"):
            hs.load_examples(tmp_path / name)
    assert hs.check_example({**ROWS[0], "label": "2"}, "row")["label"] == 2  # HF's string labels


class FakeResponse:
    def __init__(self, body, length):
        self.body, self.headers = body, {"Content-Length": str(length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        yield self.body


def test_download_checks_size_and_renames(tmp_path, monkeypatch):
    requests = pytest.importorskip("requests")
    body = (json.dumps(ROWS[0]) + "\n").encode()
    monkeypatch.setattr(requests, "get", lambda url, **kw: FakeResponse(body[:50], len(body)))
    with pytest.raises(NanoError, match=f"arrived with 50 of {len(body)} bytes"):
        hs.download("val", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half file, no temp file left behind
    monkeypatch.setattr(requests, "get", lambda url, **kw: FakeResponse(body, len(body)))
    path = hs.download("val", tmp_path)
    assert path == tmp_path / "hellaswag_val.jsonl" and hs.load_examples(path)[0]["ind"] == 24
    monkeypatch.setattr(requests, "get", None)  # cached now: no second download
    assert hs.download("val", tmp_path) == path


def test_bad_checkpoint_tokenizer_and_cli(tmp_path, data_path):
    ckpt = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(ckpt, tiny_gpt(65, 32), str(tmp_path / "gone.bpe"))
    with pytest.raises(SystemExit, match=f"^error: checkpoint {ckpt}: its tokenizer .*gone.bpe.* cannot be loaded"):
        hs.main(["--ckpt", str(ckpt), "--data", str(data_path), "--device", "cpu"])
    with pytest.raises(SystemExit, match="either --init_from or --ckpt"):
        hs.main(["--ckpt", str(ckpt), "--init_from", "gpt2"])
    with pytest.raises(SystemExit, match="unknown --style"):
        hs.main(["--style", "mmlu"])
    with pytest.raises(SystemExit, match="^error: unknown model 'gpt5'"):  # refused before any download
        hs.main(["--init_from", "gpt5", "--cache_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match="^error: --out_json .* is a folder"):
        hs.main(["--init_from", "gpt2", "--out_json", str(tmp_path)])
    with pytest.raises(SystemExit, match="--split 'test' has no labels"):
        hs.main(["--split", "test"])
    # a tokenizer larger than the model's vocabulary: one line, not an IndexError mid-run
    gpt.save_checkpoint(ckpt, tiny_gpt(4, 32), "char:abcdefgh")
    with pytest.raises(SystemExit, match="^error: the tokenizer has 8 tokens, the model only 4"):
        hs.main(["--ckpt", str(ckpt), "--data", str(data_path), "--device", "cpu"])
    # a char model meeting a character it has never seen: the example is named
    gpt.save_checkpoint(ckpt, tiny_gpt(4, 32), "char:abcd")
    with pytest.raises(SystemExit, match="error: example ind=24: character 'A' is not in the model's alphabet"):
        hs.main(["--ckpt", str(ckpt), "--data", str(data_path), "--device", "cpu"])
