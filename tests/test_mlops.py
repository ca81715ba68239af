"""The MLOps pieces: each experiment tracker's offline run reads back the rows of metrics.jsonl
(W&B's offline run file, MLflow's local store through its client, TensorBoard's event files
through its EventAccumulator), every training script takes --tracker, and the Dockerfile
installs and tests with the README's own command lines."""

import json
import re
import struct
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
# rows like the scripts' own: eval rows and step rows sharing an iter, a None (mfu on CPU), text,
# "step"-keyed rows (dpo, rl), "/" in names (dpo's eval/...), floats that need all 17 digits
ROWS = [{"iter": 0, "val_loss": 4.174387454986572, "val_bpb": 6.0224},
        {"iter": 1, "loss": 4.1, "lr": 0.000123456789, "mfu": None, "tokens_per_s": 1234.5678},
        {"iter": 2, "loss": 3.9876543210987654, "lr": 0.0002, "mfu": None, "tokens_per_s": 1300.0},
        {"iter": 2, "train_loss": 3.5, "val_loss": 3.75, "note": "text stays in the file"},
        {"step": 3, "eval/accuracy": 0.625, "eval/margin": -1e-7}]


def numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def series(rows):
    """{name: [(step, value), ...]}: what MLflow and TensorBoard keep of rows."""
    out = {}
    for row in rows:
        step = row.get("iter", row.get("step"))
        for k, v in numbers(row).items():
            out.setdefault(k, []).append((step, v))
    return out


def log_rows(out_dir, kind):
    config = {"n_layer": 2, "learning_rate": 3e-3, "dataset": "shakespeare_char", "tracker": kind}
    with common.MetricsLog(out_dir / "metrics.jsonl", tracker=kind, config=config) as log:
        for row in ROWS:
            log.log(row)
    file_rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert file_rows == ROWS
    return file_rows, config


# ---- W&B: the offline run file is a LevelDB-style log of protobuf records (wandb's datastore format)

def wandb_records(path):
    """The records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB blocks
    of chunks (crc32c 4, length 2, type 1: full, first, middle, last); a block's last < 7 bytes are padding."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def wandb_read_back(out_dir):
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for blob in wandb_records(run_file):
        record = pb.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({k: v for k, v in row.items() if not k.startswith("_")})  # _step, _runtime, _timestamp
        elif record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return history, config


def test_wandb_offline_run_reads_back_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline
    file_rows, config = log_rows(tmp_path, "wandb")
    history, run_config = wandb_read_back(tmp_path)
    assert history == [numbers(r) for r in file_rows]
    assert {k: run_config[k] for k in config} == config


def test_mlflow_local_store_reads_back_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    file_rows, config = log_rows(tmp_path, "mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("nanollm").experiment_id])
    assert run.info.status == "FINISHED"
    got = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    assert got == series(file_rows)
    assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def test_tensorboard_event_files_read_back_the_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    file_rows, config = log_rows(tmp_path, "tensorboard")
    assert tensorboard_series(tmp_path / "tensorboard") == series(file_rows)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("config/text_summary")
    assert json.loads(tensor_util.make_ndarray(text.tensor_proto).item().decode()) == config


def tensorboard_series(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if not t.startswith("config")]
    return {t: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(t)] for t in tags}


def test_train_py_run_reaches_the_tracker(tmp_path, shakespeare_path):
    """End to end: train.py --tracker tensorboard; its event files hold metrics.jsonl's rows."""
    pytest.importorskip("tensorboard")
    import train

    src = tmp_path / "text.txt"
    src.write_text(shakespeare_path.read_text()[:20_000])
    out = tmp_path / "out"
    train.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
                "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "1",
                "--sample_tokens", "0", "--device", "cpu", "--input", str(src), "--data_root", str(tmp_path / "data"),
                "--out_dir", str(out), "--tracker", "tensorboard"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and tensorboard_series(out / "tensorboard") == series(rows)  # 4 steps, 3 evals


def test_a_resumed_log_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "lo')  # torn by a kill
    with common.MetricsLog(path, resume_iter=1) as log:
        log.log({"iter": 2, "loss": 1.75})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"iter": 1, "loss": 2.0},
                                                                           {"iter": 2, "loss": 1.75}]
    with common.MetricsLog(path, active=False) as log:  # DDP ranks other than 0
        log.log({"iter": 9})
    assert "9" not in path.read_text() and not path.with_name("metrics.jsonl.new").exists()


def test_unknown_or_missing_tracker_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(common.NanoError, match=r"unknown --tracker 'neptune' \(one of none, wandb, mlflow"):
        common.MetricsLog(tmp_path / "metrics.jsonl", tracker="neptune")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(common.NanoError, match=r"^--tracker mlflow needs the mlflow package \(pip install mlflow\)$"):
        common.MetricsLog(tmp_path / "metrics.jsonl", tracker="mlflow")
    assert not list(tmp_path.iterdir())  # refused before anything was written


SCRIPTS = {"train": "TrainConfig", "fsdp2_train": "FSDP2Config", "finetune": "FinetuneConfig",
           "qlora_nf4": "QLoRAConfig", "sft": "SFTConfig", "dpo": "DPOConfig", "reward": "RewardConfig",
           "rl": "RLConfig", "moe": "TrainConfig", "distill": "DistillConfig"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_training_script_takes_tracker(script):
    import importlib

    config_cls = getattr(importlib.import_module(script), SCRIPTS[script])
    assert common.parse_config(config_cls, ["--tracker", "tensorboard"]).tracker == "tensorboard"
    assert common.parse_config(config_cls, []).tracker == "none"
    if script != "qlora_nf4":  # qlora_nf4 runs finetune's loop
        assert "tracker=cfg.tracker" in (ROOT / f"{script}.py").read_text(), f"{script}.py does not pass --tracker on"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sample_profile_writes_a_chrome_trace(tmp_path, capsys, arch):
    import gpt
    import sample

    alphabet = "".join(chr(c) for c in range(32, 127)) + "\n"
    shape = dict(block_size=32, vocab_size=len(alphabet), n_layer=2, n_head=2, n_embd=32)
    config = gpt.llama_config(**shape) if arch == "llama" else gpt.GPTConfig(**shape)
    gpt.save_checkpoint(tmp_path / "ckpt.pt", gpt.GPT(config), "char:" + alphabet)
    trace = tmp_path / "trace.json"
    table = sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO:", "--device", "cpu",
                         "--profile", str(trace)])
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"prefill", "decode"} <= names
    assert sum(e.get("name") == "decode" and e.get("ph") == "X" for e in events) == 8  # 8 decode steps
    attention = {n for n in names if "scaled_dot_product" in n}
    matmul = {n for n in names if n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm")}
    assert attention and matmul, sorted(names)
    printed = capsys.readouterr().out
    assert table in printed and "Name" in table and "aten::scaled_dot_product_attention" in table


# ---- the container: Docker cannot build here (no daemon), so its commands are checked against the README's

def readme_commands():
    """The README's bash lines (`install && run`), and its CPU torch line."""
    readme = (ROOT / "README.md").read_text()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()]
    main_job = next(line for line in lines if line.startswith("pip install -r requirements.txt && "))
    tests = next(line for line in lines if line.startswith("pip install -r requirements-dev.txt && "))
    cpu_torch = " ".join(re.search(r"`(pip install torch --index-url\s+\S+)`", readme).group(1).split())
    return [part.strip() for part in main_job.split("&&")], [part.strip() for part in tests.split("&&")], cpu_torch


def dockerfile_stages(text):
    """{stage: {"from": base, "run": [commands], "cmd": command}} and the ARG defaults."""
    text = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", text))  # comments out, continuations joined
    stages, args, current = {}, {}, None
    for line in filter(None, (line.strip() for line in text.splitlines())):
        word, _, rest = line.partition(" ")
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            current = stages.setdefault(name.strip(), {"from": base.strip(), "run": [], "cmd": None})
        elif word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        elif word == "RUN":
            current["run"] += [part.strip() for part in rest.split("&&")]
        elif word == "CMD":
            current["cmd"] = " ".join(json.loads(rest)) if rest.startswith("[") else rest
    return stages, args


def test_dockerfile_runs_the_readmes_commands():
    (install, main_job), (dev_install, test_command), cpu_torch = readme_commands()
    stages, args = dockerfile_stages((ROOT / "Dockerfile").read_text())
    assert list(stages) == ["base", "test", "app"]  # the last stage is what `docker build .` makes
    assert stages["test"]["from"] == stages["app"]["from"] == "base"
    torch_line = next(r for r in stages["base"]["run"] if r.startswith("pip install torch"))
    assert torch_line.replace("${TORCH_INDEX}", args["TORCH_INDEX"]) == cpu_torch  # the CPU build by default
    assert install in stages["base"]["run"] and stages["app"]["cmd"] == main_job
    assert dev_install in stages["test"]["run"] and stages["test"]["cmd"] == test_command
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]  # CI runs the same test command
    assert ci == f"{dev_install} && {test_command}"
    readme = (ROOT / "README.md").read_text()
    assert "docker run --rm --gpus all" in readme and "torchrun --standalone --nproc_per_node=8 fsdp2_train.py" in readme
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"requirements.txt", "tests", "assets"}.isdisjoint(ignored) and {".git", "out*/", "data/"} <= set(ignored)


@pytest.mark.slow
def test_docker_builds_and_runs_the_suite():
    """Where a Docker daemon answers: build the test stage and run the README's test command in it."""
    import shutil
    import subprocess

    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("no Docker daemon here")
    subprocess.run(["docker", "build", "--target", "test", "-t", "nanollm-test", str(ROOT)], check=True)
    subprocess.run(["docker", "run", "--rm", "nanollm-test"], check=True)
