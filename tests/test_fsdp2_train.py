"""fsdp2_train.py on CPU with gloo: 2 ranks (torchrun, this file as the worker) against 1 process.

One torchrun launch runs every 2-rank scenario (a launch costs seconds of imports) while
pytest runs the 1-process references in-process; each test then checks one property.
Models: GPT-2-shaped from scratch, and a tiny random Llama (GQA, SwiGLU, RMSNorm, RoPE,
untied head) written by transformers' save_pretrained with a bpe.py tokenizer.json, read
through --init_from DIR as any Hugging Face folder.
Tolerance 1e-5 on losses in fp32: the 2-rank run sums the same numbers in another order
(two half-batch means averaged by the reduce-scatter instead of one full-batch mean), which
moves a ~4.0 loss by a few float32 ulps (~5e-7) per step; 1e-5 leaves room for 12 steps of
AdamW without hiding a real difference (a skipped gradient sync moves the second loss by
2e-2, a wrong batch slice the first one by about as much).
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import NanoError
import torch

# even one rank's gloo group binds to 127.0.0.1: every test here needs the loopback interface
pytestmark = pytest.mark.usefixtures("loopback")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
        "--eval_iters", "1", "--log_interval", "1", "--warmup_iters", "2", "--device", "cpu"]


def args(data_root, out_dir, *extra):
    return TINY + ["--data_root", str(data_root), "--out_dir", str(out_dir), *map(str, extra)]


# a pretrained model brings its own shape: only the training options of TINY
MODEL_SHAPE = ("--n_layer", "--n_head", "--n_embd")
TRAIN_ONLY = [a for i, a in enumerate(TINY) if a not in MODEL_SHAPE and TINY[i - 1] not in MODEL_SHAPE]
EOT = "<|endoftext|>"


# the tiny Llama runs (the same under 1 and 2 processes); the full one saves at iter 4
LLAMA_FULL = ("--max_iters", 6, "--eval_interval", 4)
LLAMA_QLORA = ("--mode", "qlora", "--max_iters", 6, "--eval_interval", 100, "--learning_rate", 1e-2)


def llama_args(llama, out_dir, *extra):
    """A run from the tiny Llama folder (see the tiny_llama fixture) on its tokenized text."""
    return TRAIN_ONLY + ["--init_from", llama["dir"], "--dataset", "shakespeare", "--input", llama["src"],
                         "--data_root", llama["data_root"], "--out_dir", str(out_dir), *map(str, extra)]


def make_tiny_llama(folder, text):
    """A random LlamaForCausalLM (2 blocks, 4 query heads sharing 2 key/value heads, untied
    head) saved by transformers, with a byte-level BPE tokenizer.json trained on the text."""
    import transformers

    import bpe
    import tokenizer

    folder.mkdir(parents=True)
    vocab, merges = bpe.train_bpe(text[:20_000], 300, special_tokens=(EOT,))
    tokenizer.save_tokenizer_json(bpe.Tokenizer(vocab, merges, (EOT,)), folder / "tokenizer.json")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def losses_of(result):
    return [loss for _, loss in result["losses"]]


# ----------------------------------------------------------------------------------------
# The 2-rank worker: `torchrun --nproc_per_node=2 tests/test_fsdp2_train.py DATA_ROOT WORK LLAMA_JSON`


def _worker(data_root, work, llama):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import fsdp2_train
    import data
    import gpt
    import lora
    import qlora_nf4

    # the group main() would make from torchrun's environment, made once here so that every
    # main() below reuses it (re-creating a default group under one torchrun is not reliable)
    ranks = fsdp2_train.init_distributed("cpu")
    rank, world = ranks.rank, ranks.world
    work, llama = Path(work), json.loads(llama)
    report = {}

    def shards(model):
        return {n: [list(p.to_local().shape), list(p.shape), p.dtype == torch.uint8]
                for n, p in model.named_parameters() if isinstance(p, DTensor)}

    @torch.no_grad()
    def export_logit_diff(model, path):
        idx = torch.randint(0, 60, (2, 32), generator=torch.Generator().manual_seed(0))
        sharded, _ = model(idx)  # a collective forward on every rank
        if rank != 0:
            return None
        exported, _ = gpt.load_checkpoint(path)
        return (exported.eval()(idx)[0] - sharded).abs().max().item()

    # full model: 12 steps, sharded checkpoint at iter 10, export at the end
    res = fsdp2_train.main(args(data_root, work / "full", "--max_iters", 12, "--eval_interval", 10,
                                "--export", work / "full" / "ckpt.pt"))
    report["full"] = losses_of(res)
    report["full_shards"] = shards(res["model"])
    report["full_bytes"] = fsdp2_train.local_param_bytes(res["model"])
    report["full_export_diff"] = export_logit_diff(res["model"], work / "full" / "ckpt.pt")

    # resume the iter-10 checkpoint on 2 ranks
    if rank == 0:
        shutil.copytree(work / "full", work / "resumed")
    dist.barrier()
    res = fsdp2_train.main(args(data_root, work / "resumed", "--max_iters", 12, "--eval_interval", 10, "--resume", True))
    report["resumed"] = res["losses"]

    # qlora: snapshot the NF4 bytes of the freshly sharded model, train, compare
    qargs = args(data_root, work / "qlora", "--mode", "qlora", "--max_iters", 10, "--eval_interval", 100,
                 "--learning_rate", 1e-2, "--export", work / "qlora" / "ckpt.pt")
    cfg, _ = fsdp2_train.parse_args(qargs)
    vocab_size = data.read_meta(Path(data_root) / "shakespeare_char")["vocab_size"]
    fresh, _ = fsdp2_train.build_model(cfg, vocab_size, "cpu", torch.float32)
    fsdp2_train.shard_model(fresh, init_device_mesh("cpu", (world,)), cfg, None)
    before = {n: p.to_local().clone() for n, p in fresh.named_parameters() if p.dtype == torch.uint8}
    res = fsdp2_train.main(qargs)
    model = res["model"]
    after = {n: p.to_local() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    report["qlora"] = losses_of(res)
    report["qlora_shards"] = shards(model)
    report["nf4_unchanged"] = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    report["nf4_tensors"] = len(after)
    report["qlora_export_diff"] = export_logit_diff(model, work / "qlora" / "ckpt.pt")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 60, (4, 32), generator=g), torch.randint(0, 60, (4, 32), generator=g)
    model(x, y)[1].backward()
    report["adapter_grad_abs"] = {n: p.grad.to_local().abs().sum().item()
                                  for n, p in model.named_parameters() if p.requires_grad}
    report["frozen_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)

    # lora: frozen fp32 base + adapters, exported merged
    res = fsdp2_train.main(args(data_root, work / "lora", "--mode", "lora", "--max_iters", 3, "--eval_interval", 100,
                                "--learning_rate", 1e-2, "--export", work / "lora" / "ckpt.pt"))
    report["lora_export_diff"] = export_logit_diff(res["model"], work / "lora" / "ckpt.pt")

    # HSDP (2 replicas x 1 shard) + activation checkpointing + 2 accumulation micro-steps
    res = fsdp2_train.main(args(data_root, work / "hsdp", "--max_iters", 3, "--eval_interval", 100, "--hsdp", True,
                                "--hsdp_shard_size", 1, "--activation_checkpointing", True,
                                "--gradient_accumulation_steps", 2, "--batch_size", 4))
    report["hsdp_ac_accum"] = losses_of(res)

    # the Llama family from a Hugging Face folder: full, and QLoRA with its export
    res = fsdp2_train.main(llama_args(llama, work / "llama_full", *LLAMA_FULL))
    report["llama_full"] = losses_of(res)
    report["llama_units"] = [n for n, m in res["model"].named_modules() if isinstance(m, FSDPModule)]
    res = fsdp2_train.main(llama_args(llama, work / "llama_qlora", *LLAMA_QLORA, "--export",
                                      work / "llama_qlora" / "ckpt.pt"))
    model = res["model"]
    report["llama_qlora"] = losses_of(res)
    report["llama_qlora_shards"] = shards(model)
    report["llama_qlora_export_diff"] = export_logit_diff(model, work / "llama_qlora" / "ckpt.pt")
    report["llama_nf4"] = sorted(n for n, m in model.named_modules() if isinstance(m, qlora_nf4.Linear4bit))
    report["llama_adapted"] = sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear))
    report["llama_head_dtype"] = str(model.lm_head.weight.dtype)

    # bad input: every rank leaves through SystemExit(1); rank 0 has printed the one line
    def exit_message(argv):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                fsdp2_train.main(argv)
        except SystemExit as e:
            return e.code, stderr.getvalue()
        return None

    report["bad_batch"] = exit_message(args(data_root, work / "bad", "--batch_size", 3))
    report["bad_shape_option"] = exit_message(args(data_root, work / "resumed", "--resume", True, "--n_embd", 64))
    if rank == 0:  # a checkpoint whose tensors do not fit the model its train_state.json describes
        shutil.copytree(work / "full", work / "tampered")
        state_file = work / "tampered" / "ckpt_dcp" / "train_state.json"
        state = json.loads(state_file.read_text())
        state["model_config"]["n_embd"] = 64
        state_file.write_text(json.dumps(state))
    dist.barrier()
    shape_given = {"--n_layer", "--n_head", "--n_embd", "--block_size"}
    no_shape = [a for i, a in enumerate(TINY) if a not in shape_given and TINY[i - 1] not in shape_given]
    report["bad_shape_tensors"] = exit_message(no_shape + ["--data_root", str(data_root), "--out_dir",
                                                           str(work / "tampered"), "--resume", "True"])
    if rank == 0:  # rank 1's shard file gone: its read fails, DCP tells every rank
        shutil.copytree(work / "full", work / "no_shard")
        (work / "no_shard" / "ckpt_dcp" / "__1_0.distcp").unlink()
    dist.barrier()
    report["missing_shard"] = exit_message(args(data_root, work / "no_shard", "--max_iters", 12, "--resume", True))
    (work / f"rank{rank}.json").write_text(json.dumps(report))
    # last, the command-line path for real: rank 0 prints one line to stderr, every rank
    # leaves with status 1, torchrun returns (the test fails on a hang)
    try:
        fsdp2_train.main(args(data_root, work / "bad", "--batch_size", 3))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(*sys.argv[1:])


# ----------------------------------------------------------------------------------------
# pytest side


def _torchrun(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # its own session: on a hang, the launcher and both ranks are killed together
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait(proc, timeout=180):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung (killed after {timeout}s):\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, shakespeare_path):
    """{"dir": the tiny Llama folder, "src": its text, "data_root": the text tokenized with its
    tokenizer.json}, tokenized here once so that concurrent runs only read it."""
    pytest.importorskip("transformers", reason="transformers writes the reference Hugging Face folder")
    import data

    base = tmp_path_factory.mktemp("tiny_llama")
    src = base / "shakespeare_100k.txt"
    src.write_text(shakespeare_path.read_text()[:100_000])
    folder = make_tiny_llama(base / "llama", src.read_text())
    data.prepare_dataset("shakespeare", input=src, tokenizer=str(folder / "tokenizer.json"), data_root=base / "data")
    return {"dir": str(folder), "src": str(src), "data_root": str(base / "data")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_path, tiny_llama):
    """Start the 2-rank worker and the bad-CLI launch, run the 1-process references meanwhile."""
    import fsdp2_train
    import data

    base = tmp_path_factory.mktemp("fsdp2")
    src = base / "shakespeare_100k.txt"
    src.write_text(shakespeare_path.read_text()[:100_000])
    data_root = base / "data"
    data.prepare_dataset("shakespeare_char", input=src, data_root=data_root)
    work = base / "work"
    work.mkdir()
    worker = _torchrun(Path(__file__), data_root, work, json.dumps(tiny_llama))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's two ranks share the cores
    try:
        one = {}
        res = fsdp2_train.main(args(data_root, base / "one_full", "--max_iters", 12, "--eval_interval", 10))
        one["full"] = losses_of(res)
        one["full_metrics"] = [json.loads(line) for line in open(base / "one_full" / "metrics.jsonl")]
        res = fsdp2_train.main(args(data_root, base / "one_qlora", "--mode", "qlora", "--max_iters", 10,
                                    "--eval_interval", 100, "--learning_rate", 1e-2))
        one["qlora"] = losses_of(res)
        res = fsdp2_train.main(args(data_root, base / "one_accum", "--max_iters", 3, "--eval_interval", 100,
                                    "--gradient_accumulation_steps", 2, "--batch_size", 4))
        one["accum"] = losses_of(res)
        one["plain"] = plain_training(data_root, steps=12)
        one["llama_full"] = losses_of(fsdp2_train.main(llama_args(tiny_llama, base / "one_llama", *LLAMA_FULL)))
        one["llama_resumed"] = fsdp2_train.main(llama_args(tiny_llama, base / "one_llama", *LLAMA_FULL,
                                                           "--resume", True))["losses"]
        one["llama_qlora"] = losses_of(fsdp2_train.main(llama_args(tiny_llama, base / "one_llama_qlora",
                                                                   *LLAMA_QLORA)))
        one["worker"] = rc, out, err = _wait(worker)  # ends with a bad --batch_size: rc 1 is expected
        if not all((work / f"rank{r}.json").is_file() for r in range(2)):
            pytest.fail(f"2-rank worker failed (rc {rc}):\n{err[-4000:]}")
        two = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
        # the 2-rank checkpoint of iter 10, resumed by one process
        shutil.copytree(work / "full", base / "one_resumed")
        res = fsdp2_train.main(args(data_root, base / "one_resumed", "--max_iters", 12, "--eval_interval", 10,
                                    "--resume", True))
        one["resumed_from_2"] = res["losses"]
    finally:
        torch.set_num_threads(threads)
        if worker.poll() is None:  # a 1-process run failed first: do not leave the ranks behind
            os.killpg(worker.pid, signal.SIGKILL)
            worker.communicate()
    return one, two


def plain_training(data_root, steps):
    """The same run without FSDP or torch.distributed: GPT + AdamW + clipping on the global batch."""
    import fsdp2_train
    import common
    import data
    import gpt

    cfg, _ = fsdp2_train.parse_args(args(data_root, "unused"))
    data_dir = Path(data_root) / "shakespeare_char"
    bins = data.TokenBins(data_dir, "train")
    common.set_seed(cfg.seed)
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=data.read_meta(data_dir)["vocab_size"],
                                  n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = fsdp2_train.get_lr(it, cfg)
        x, y = bins.get_batch(cfg.batch_size, cfg.block_size, g)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def close(a, b, tol=1e-5):
    assert len(a) == len(b), (a, b)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff <= tol, f"max |difference| {diff:.3g} > {tol}: {a} vs {b}"


def test_one_process_equals_plain_training(runs):
    one, _ = runs
    close(one["full"], one["plain"], tol=1e-6)  # 1 rank: the same arithmetic as no FSDP at all
    assert one["full"][-1] < one["full"][0] - 0.05  # it does train
    rows = one["full_metrics"]
    assert {"iter", "loss", "lr", "ms_per_step", "tokens_per_s", "mfu"} == set(rows[1])
    assert {"iter", "train_loss", "val_loss"} == set(rows[0])


def test_two_ranks_match_one_process_full_and_qlora(runs):
    one, two = runs
    for rank in (0, 1):  # every rank logs the same all-reduced loss
        for key in ("full", "qlora", "llama_full", "llama_qlora"):
            close(two[rank][key], one[key])
    assert len(one["full"]) == 12 and len(one["qlora"]) == 10
    assert len(one["llama_full"]) == len(one["llama_qlora"]) == 6
    for key in ("qlora", "llama_full", "llama_qlora"):  # each one trains: the match is not of constants
        assert one[key][-1] < one[key][0] - 0.05, (key, one[key])


def test_llama_from_hf_folder_one_fsdp_unit_per_block(runs):
    import lora

    _, two = runs
    assert two[0]["llama_units"] == ["", "transformer.h.0", "transformer.h.1"]  # root + one per block
    # QLoRA on Llama: every Linear of a block in NF4 under a LoRA adapter, the head left alone
    adapted = two[0]["llama_adapted"]
    assert len(adapted) == 2 * 7 and {n.rsplit(".", 1)[1] for n in adapted} == set(lora.DEFAULT_TARGETS["llama"])
    assert two[0]["llama_nf4"] == [n + ".base" for n in adapted]
    assert two[0]["llama_head_dtype"] == "torch.float32"


def test_llama_resumes_where_it_left_off(runs):
    one, _ = runs
    assert [i for i, _ in one["llama_resumed"]] == [5, 6]
    assert [loss for _, loss in one["llama_resumed"]] == one["llama_full"][4:]  # the same world size: bit-identical


def test_hsdp_activation_checkpointing_and_accumulation_match(runs):
    one, two = runs
    close(two[0]["hsdp_ac_accum"], one["accum"])


def test_each_rank_holds_its_shard(runs):
    _, two = runs
    for key in ("full_shards", "qlora_shards", "llama_qlora_shards"):
        for name in two[0][key]:
            (local0, full, _), (local1, _, _) = two[0][key][name], two[1][key][name]
            rows = full[0]
            assert local0[0] == (rows + 1) // 2 and local1[0] == rows // 2, (name, local0, local1, full)
            assert local0[1:] == full[1:], name
    # the NF4 bytes and absmax codes are sharded parameters, not replicated buffers
    for key in ("qlora_shards", "llama_qlora_shards"):
        u8 = [n for n, (_, _, is_u8) in two[0][key].items() if is_u8]
        assert any(n.endswith("base.weight") for n in u8) and any(n.endswith("base.absmax") for n in u8)
    local = [two[r]["full_bytes"][0] for r in (0, 1)]
    full = two[0]["full_bytes"][1]
    assert sum(local) == full  # nothing held twice
    assert all(abs(b - full / 2) < 0.02 * full for b in local), (local, full)


def test_nf4_frozen_and_adapters_learn(runs):
    _, two = runs
    for rank in (0, 1):
        assert two[rank]["nf4_unchanged"] and two[rank]["nf4_tensors"] == 2 * 2 * 4  # weight + absmax, 4 Linears x 2 blocks
        grads = two[rank]["adapter_grad_abs"]
        assert len(grads) == 2 * 2 * 4 and all(".lora_" in n for n in grads)
        assert all(g > 0 for g in grads.values()), grads
        assert two[rank]["frozen_grads"] == 0


def test_checkpoint_resumes_on_two_and_one_rank(runs):
    one, two = runs
    full = dict((i, loss) for i, loss in zip(range(1, 13), two[0]["full"]))
    resumed2 = dict(two[0]["resumed"])
    assert list(resumed2) == [11, 12]
    assert all(resumed2[i] == full[i] for i in resumed2)  # same world size: bit-identical
    resumed1 = dict(one["resumed_from_2"])
    assert list(resumed1) == [11, 12]
    close([resumed1[i] for i in (11, 12)], [full[i] for i in (11, 12)])


def test_export_logits_equal_sharded_model(runs):
    _, two = runs
    assert two[0]["full_export_diff"] == 0.0  # the same fp32 weights, the same arithmetic
    # merged LoRA / QLoRA: (W + scaling * B @ A) x in one matmul vs W x + scaling * B (A x),
    # W the dequantized NF4 weight for QLoRA: the same function, fp32 rounding only
    assert two[0]["lora_export_diff"] < 1e-5
    assert two[0]["qlora_export_diff"] < 1e-5
    assert two[0]["llama_qlora_export_diff"] < 1e-5  # and with Llama's own (untied) head


def test_bad_input_one_line_and_every_rank_exits(runs):
    one, two = runs
    for key, words in [("bad_batch", "not divisible by the world size 2"), ("bad_shape_option", "saved with n_embd=32"),
                       ("bad_shape_tensors", "holds model.transformer.wte.weight of shape ("),
                       ("missing_shard", "is damaged (FileNotFoundError: [Errno 2] No such file or directory: ")]:
        (code0, err0), (code1, err1) = two[0][key], two[1][key]
        assert code0 == code1 == 1 and err1 == ""
        assert err0.startswith("error: ") and err0.count("\n") == 1 and words in err0, err0
    rc, out, err = one["worker"]  # under torchrun for real: finished (no hang), one error line
    assert rc == 1
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch_size 3 (the global batch) is not divisible by the world size 2 "
                      "(pass a multiple of 2)"], err[-2000:]


def test_qlora_on_cuda_needs_triton(monkeypatch):
    import importlib.util

    import fsdp2_train

    cfg, _ = fsdp2_train.parse_args(["--mode", "qlora"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    ranks = fsdp2_train.Ranks(rank=0, world=1, local_world=1, device="cuda:0", created_group=False)
    with pytest.raises(NanoError, match="needs triton"):
        fsdp2_train.validate(cfg, ranks)


# ----------------------------------------------------------------------------------------
# Checkpoint safety, in one process: no code from .metadata, no save state that loses a
# checkpoint, one line for a damaged one


class _Evil:
    """A pickle that runs a shell command when loaded (what a planted .metadata would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not caught as an Exception)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shakespeare_path):
    """A 1-process run with sharded checkpoints at iters 2 and 4; returns (data_root, out_dir)."""
    import data
    import fsdp2_train

    base = tmp_path_factory.mktemp("fsdp2_ckpt")
    src = base / "shakespeare_20k.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    data.prepare_dataset("shakespeare_char", input=src, data_root=base / "data")
    fsdp2_train.main(args(base / "data", base / "run", "--max_iters", 4, "--eval_interval", 2,
                          "--always_save_checkpoint", True, "--export", base / "run" / "ckpt.pt"))
    return base / "data", base / "run"


def _resume(data_root, out_dir, max_iters=5):
    import fsdp2_train

    return fsdp2_train.main(args(data_root, out_dir, "--max_iters", max_iters, "--eval_interval", 2,
                                 "--always_save_checkpoint", True, "--resume", True))


def test_malicious_dcp_metadata_runs_no_code(saved, tmp_path):
    import pickle

    data_root, run = saved
    out = tmp_path / "evil"
    shutil.copytree(run, out)
    pwned = tmp_path / "PWNED"
    (out / "ckpt_dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(pwned)))
    with pytest.raises(SystemExit, match=r"error: checkpoint .* is damaged \(UnpicklingError: posix.system is not"):
        _resume(data_root, out)
    assert not pwned.exists()


@pytest.mark.parametrize("kill, resumes_at", [
    ((1, "before"), 1),  # shards written, train_state.json not yet: the iter-2 folder is incomplete
    ((2, "before"), 2),  # ckpt_dcp (iter 1) and a complete ckpt_dcp.tmp (iter 2)
    ((3, "before"), 2),  # ckpt_dcp.old (iter 1) and ckpt_dcp.tmp (iter 2), no ckpt_dcp
    ((3, "after"), 2),   # ckpt_dcp (iter 2) and ckpt_dcp.old (iter 1) not yet removed
])
def test_every_interrupted_save_resumes_from_the_newest_checkpoint(saved, tmp_path, monkeypatch, kill, resumes_at):
    """Kill the iter-2 save at each of its os.replace calls (json in place, old out, new in)."""
    from unittest import mock

    import fsdp2_train

    data_root, _ = saved
    out = tmp_path / "run"
    real_save, real_replace = fsdp2_train.save_dcp, os.replace
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == kill[0] and kill[1] == "before":
            raise _Killed
        real_replace(src, dst)
        if len(calls) == kill[0]:
            raise _Killed

    def save(ranks, out_dir, model, optimizer, rng, train_state):
        if train_state["iter_num"] < 2:
            return real_save(ranks, out_dir, model, optimizer, rng, train_state)
        with mock.patch.object(os, "replace", replace):
            real_save(ranks, out_dir, model, optimizer, rng, train_state)

    run = args(data_root, out, "--max_iters", 2, "--eval_interval", 1, "--always_save_checkpoint", True)
    monkeypatch.setattr(fsdp2_train, "save_dcp", save)
    with pytest.raises(_Killed):
        fsdp2_train.main(run)
    monkeypatch.setattr(fsdp2_train, "save_dcp", real_save)
    res = fsdp2_train.main(run[:-6] + ["--max_iters", "3", "--eval_interval", "1", "--resume", "True"])
    assert res["losses"][0][0] == resumes_at + 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt_dcp")) == ["ckpt_dcp"]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]  # rows past the checkpoint dropped
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 1, 2, 3]
    if kill == (3, "before"):  # the same step 3 as an uninterrupted run of 3 iterations
        clean = fsdp2_train.main(args(data_root, tmp_path / "clean", "--max_iters", 3, "--eval_interval", 1))
        assert clean["losses"][-1] == res["losses"][0]


@pytest.mark.parametrize("damage, words", [
    ("truncated_metadata", "is damaged (UnpicklingError"),
    ("missing_shard", "is damaged (FileNotFoundError: [Errno 2] No such file or directory: "),
    ("garbage_shard", "is damaged (EOFError; "),  # shorter than the tensors it should hold
    ("bad_train_state", "train_state.json is damaged (JSONDecodeError"),
    ("train_state_without_keys", "train_state.json is damaged (KeyError"),
])
def test_damaged_checkpoint_is_one_line(saved, tmp_path, capsys, damage, words):
    data_root, run = saved
    out = tmp_path / "run"
    shutil.copytree(run, out)
    ckpt = out / "ckpt_dcp"
    if damage == "truncated_metadata":
        raw = (ckpt / ".metadata").read_bytes()
        (ckpt / ".metadata").write_bytes(raw[: len(raw) // 2])
    elif damage == "missing_shard":
        next(ckpt.glob("*.distcp")).unlink()
    elif damage == "garbage_shard":
        next(ckpt.glob("*.distcp")).write_bytes(b"not a tensor shard")
    elif damage == "bad_train_state":
        (ckpt / "train_state.json").write_text('{"iter_num": 4, "mod')
    else:
        (ckpt / "train_state.json").write_text('{"iter_num": 4}')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _resume(data_root, out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: checkpoint ") and words in err, err


@pytest.mark.parametrize("option, value, words", [
    ("grad_clip", -1, "--grad_clip must be >= 0 (got -1.0)"),  # clip_grad_norm_ to -1 would ascend
    ("learning_rate", -1e-3, "--learning_rate must be positive"),
    ("max_iters", 0, "--max_iters must be positive"),
    ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps must be positive"),
    ("eval_iters", 0, "--eval_iters must be positive"),
    ("n_layer", 0, "--n_layer must be positive"),
    ("warmup_iters", -5, "--warmup_iters must be >= 0"),
    ("dropout", 1.5, "--dropout must be in [0.0, 0.99]"),
    ("beta2", 1.0, "--beta2 must be in [0.0, 0.9999]"),
    ("lora_r", 0, "--lora_r must be positive"),
])
def test_bad_numeric_option_is_one_line(tmp_path, capsys, option, value, words):
    import fsdp2_train

    with pytest.raises(SystemExit, match="error: " + words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fsdp2_train.main(args(tmp_path / "no_data", tmp_path / "out", f"--{option}", value))
    assert not (tmp_path / "no_data").exists() and capsys.readouterr().err.count("\n") == 1  # refused before work


def test_outputs_checked_before_training(tmp_path):
    import fsdp2_train

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for extra, words in [(["--out_dir", a_file], "--out_dir .* is a file or below one"),
                         (["--out_dir", a_file / "sub"], "--out_dir .* is a file or below one"),
                         (["--export", tmp_path], "--export .* is a folder"),
                         (["--export", a_file / "ckpt.pt"], "--export .* is below a file")]:
        argv = args(tmp_path / "no_data", tmp_path / "out", *extra)
        with pytest.raises(SystemExit, match="error: " + words):
            fsdp2_train.main(argv)
    assert not (tmp_path / "no_data").exists()  # nothing was prepared or trained


def test_init_from_conflicting_or_unknown_is_refused(saved, tmp_path):
    import fsdp2_train

    data_root, run = saved
    with pytest.raises(SystemExit, match=r"error: --init_from .*ckpt.pt has n_layer=2, but --n_layer 3 was given"):
        fsdp2_train.main(args(data_root, tmp_path / "a", "--init_from", run / "ckpt.pt", "--n_layer", 3))
    with pytest.raises(SystemExit, match=r"error: unknown --init_from 'gpt5' \(scratch, resume, gpt2, "):
        fsdp2_train.main(args(data_root, tmp_path / "b", "--init_from", "gpt5"))
    res = fsdp2_train.main(args(data_root, tmp_path / "c", "--init_from", run / "ckpt.pt", "--max_iters", 1,
                                "--eval_interval", 100))  # the same shape given (TINY): accepted
    assert res["iter"] == 1


# ----------------------------------------------------------------------------------------
# --init_from a Hugging Face folder or hub name, in one process


def test_bad_hf_folder_is_one_line(tiny_llama, tmp_path, capsys):
    import fsdp2_train

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bert = tmp_path / "bert"  # the tiny Llama's files, but its config.json says BERT
    shutil.copytree(tiny_llama["dir"], bert)
    (bert / "config.json").write_text(json.dumps({**json.loads((bert / "config.json").read_text()),
                                                  "model_type": "bert"}))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_llama["dir"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer.json"))
    llama = tiny_llama["dir"]
    for init_from, extra, words in [
        (no_config, [], f"{no_config} has no config.json"),
        (bert, [], "model_type 'bert' is not supported"),
        (no_tokenizer, [], f"--init_from {no_tokenizer} has no tokenizer (the data is tokenized with the model's"),
        (llama, ["--dataset", "shakespeare_char"], "--dataset shakespeare_char is character-level"),
        (llama, ["--n_head", 2], f"--init_from {llama} has n_head=4, but --n_head 2 was given"),
    ]:
        argv = TRAIN_ONLY + ["--dataset", "shakespeare", "--input", tiny_llama["src"], "--data_root",
                             tmp_path / "data", "--out_dir", tmp_path / "out", "--init_from", init_from, *extra]
        with pytest.raises(SystemExit) as e:
            fsdp2_train.main(list(map(str, argv)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "data").exists()  # refused before any tokenizing


def test_hub_name_is_downloaded_as_load_pretrained_does(tiny_llama, tmp_path, monkeypatch):
    """--init_from owner/name: gpt.load_pretrained fetches config.json, the weights and
    tokenizer.json into ~/.cache/nanollm; here a fake download serves them from the tiny
    folder (no network), and the run equals the run from the folder itself."""
    import gpt
    import fsdp2_train
    import hf_io

    served = []

    def download(url, dest, *args, **kwargs):
        src = Path(tiny_llama["dir"]) / url.rsplit("/", 1)[1]
        if not src.is_file():  # what the hub answers for a file the repository lacks
            raise NanoError(f"404 for {url}")
        served.append(src.name)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return Path(dest)

    for module in (gpt, hf_io):  # wherever the Hugging Face helpers live, the fetch is common.download
        if hasattr(module, "download"):
            monkeypatch.setattr(module, "download", download)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    losses = {}
    for name, init_from in (("hub", "tiny-org/tiny-llama"), ("folder", tiny_llama["dir"])):
        llama = dict(tiny_llama, dir=init_from, data_root=str(tmp_path / f"data_{name}"))
        res = fsdp2_train.main(llama_args(llama, tmp_path / name, "--max_iters", 2, "--eval_interval", 100))
        losses[name] = losses_of(res)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(served)
    assert losses["hub"] == losses["folder"] and len(losses["hub"]) == 2
