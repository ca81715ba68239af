"""Plumbing every nanollm script shares, none of it an idea of its own.

- the one error type (`NanoError`) and the `cli` wrapper that turns it into `error: ...`;
- a dataclass config turned into an argparse CLI (`parse_config`), and the options every
  pretraining script shares (`TrainingConfig`);
- device, dtype and autocast choice; seeds;
- the learning-rate schedules (warmup + cosine, as every trainer uses; warmup-stable-decay);
- peak FLOP/s (for MFU), peak memory and a median timer;
- rank-0-first for work that one rank of a torchrun job must do before the others;
- metrics.jsonl (`MetricsLog`) and the experiment trackers it can feed (`Tracker`: W&B, MLflow,
  TensorBoard, offline by default);
- files written whole or not at all (`atomic_write`, `atomic_save`), downloads that are too
  (`download`), and the cache they go to (`nanollm_cache`).

This file imports nothing of nanollm's.
"""

from __future__ import annotations

import argparse
import errno
import functools
import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch


class NanoError(ValueError):
    """Bad input: a one-line message `<what> (<how to fix>)`. Library code raises it, checked
    before any long work starts; only a script's `main()` (through `cli`) turns it into
    `error: <message>` on stderr and exit status 2, so a notebook that imports a file never exits."""

    one_line = True  # cli prints any ValueError marked so: also bpe.py's BPEError (bpe.py imports nothing of ours)


class CLIError(SystemExit):
    """How `cli` leaves: exit status 2; str() is the line printed, so tests can match on it."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def cli(main):
    """Decorate a script's `main(argv=None)`: a NanoError (or bpe.BPEError) becomes one `error:`
    line and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ValueError as e:
            if not getattr(e, "one_line", False):
                raise
            line = f"error: {e}"
            print(line, file=sys.stderr, flush=True)
            raise CLIError(line) from None

    return wrapper


# ----------------------------------------------------------------------------------------
# A CLI from a dataclass


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def parse_config(config_cls, argv=None, description=None):
    """Turn a dataclass into an argparse CLI: every field is an option `--name` with its
    default shown in --help; booleans take a value (`--compile False`, `--compile=False`) or
    none (a bare `--force` means True)."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        kind = hints[f.name]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        convert = _parse_bool if kind is bool else kind
        if optional:
            convert = (lambda c: lambda s: None if s.lower() == "none" else c(s))(convert)
        default = f.default if f.default is not MISSING else f.default_factory()
        bare = dict(nargs="?", const=True) if kind is bool else {}  # `--force` alone is `--force True`
        parser.add_argument(f"--{f.name}", type=convert, default=default, metavar=kind.__name__.upper(), **bare,
                            help=(f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)r)").lstrip())
    args = parser.parse_args(argv)
    return config_cls(**vars(args))


TRACKERS = ("none", "wandb", "mlflow", "tensorboard")


def tracker_option() -> dict:
    """Every training script's `--tracker` option: `tracker: str = field(**common.tracker_option())`."""
    return dict(default="none", metadata={"help": "also send metrics.jsonl's rows to none | wandb | mlflow | "
                                                  "tensorboard (offline, under out_dir)"})


@dataclass
class TrainingConfig:
    """The options every pretraining script shares: nanoGPT's train.py config, its names and
    defaults. train.py and fsdp2_train.py subclass it, add their own options and re-declare a
    field whose default or help differs there (a re-declared field keeps its place in --help)."""
    # data
    dataset: str = field(default="shakespeare_char", metadata={"help": "shakespeare_char | shakespeare | fineweb_edu | tinystories | text:<path>"})
    input: str = field(default="", metadata={"help": "local copy of the raw text instead of downloading it"})
    data_root: str = "data"
    # model
    init_from: str = field(default="scratch", metadata={"help": "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a checkpoint file (weights only)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt (same as --init_from resume)"})
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = field(default=0.0, metadata={"help": "for models built from scratch"})
    bias: bool = field(default=True, metadata={"help": "biases in Linears and norms"})
    # optimisation
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm to this (0 = off)"})
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    tracker: str = field(**tracker_option())
    always_save_checkpoint: bool = field(default=False, metadata={"help": "save at every eval, not only on a better val loss"})
    out_dir: str = "out"
    # system
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    peak_flops: float = field(default=0.0, metadata={"help": "device peak FLOP/s for MFU (0 = datasheet table for A100/H100/H200)"})
    seed: int = 1337


# ----------------------------------------------------------------------------------------
# Device, precision, seeds


def pick_device(name="auto") -> str:
    if name != "auto":
        if name.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise NanoError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N or mps)")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise NanoError("--device cuda but CUDA is not available (use --device cpu or auto)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, name="auto") -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if "cuda" in device:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in table:
        raise NanoError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return table[name]


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def set_seed(seed: int):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Learning-rate schedule, FLOPs, memory


def cosine_lr(it, max_lr, min_lr, warmup_iters, decay_iters):
    """nanoGPT's schedule: linear warmup to max_lr over warmup_iters, cosine decay to min_lr
    at decay_iters, then flat. Warmup starts above zero so step 0 already learns."""
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def wsd_lr(it, max_lr, min_lr, warmup_iters, decay_iters, cooldown_iters, cooldown="linear"):
    """Warmup-stable-decay (MiniCPM, arXiv:2404.06395; Hägele et al. 2024, arXiv:2405.18392): the
    warmup above, then max_lr held, then a cooldown to min_lr over the last cooldown_iters before
    decay_iters: linear, or "1-sqrt" (lr falls as 1 - sqrt(progress): fast at first, which the
    paper found better than linear). The stable phase needs no end date: a run can be extended and
    cooled down from any point. cooldown_iters 0: constant after warmup."""
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    start = decay_iters - cooldown_iters
    if it < start or cooldown_iters <= 0:
        return max_lr
    if it >= decay_iters:
        return min_lr
    progress = (it - start) / cooldown_iters
    left = 1 - math.sqrt(progress) if cooldown == "1-sqrt" else 1 - progress
    return min_lr + left * (max_lr - min_lr)


LR_SCHEDULES = ("cosine", "wsd", "constant")


def schedule_lr(it, schedule, max_lr, min_lr, warmup_iters, decay_iters, cooldown_iters=0, cooldown="linear"):
    """The learning rate at step `it` of a named schedule: cosine (nanoGPT's), wsd, or constant
    (warmup, then max_lr)."""
    if schedule == "cosine":
        return cosine_lr(it, max_lr, min_lr, warmup_iters, decay_iters)
    if schedule not in LR_SCHEDULES:
        raise NanoError(f"unknown lr schedule {schedule!r} ({', '.join(LR_SCHEDULES)})")
    return wsd_lr(it, max_lr, min_lr, warmup_iters, decay_iters, cooldown_iters if schedule == "wsd" else 0, cooldown)


# dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: str, dtype=torch.bfloat16, override=None):
    """The device's peak FLOP/s for MFU: --peak_flops if given, else the datasheet figure
    of a known GPU, else None (MFU is then not reported)."""
    if override:
        return float(override)
    if "cuda" in device and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2  # TF32 runs at half rate
    return None


def median_ms(fn, repeat=5, warmup=1):
    """Median wall time of fn() in milliseconds, after `warmup` calls (compiles, caches); CUDA is
    synchronised around each call so the time is the GPU's, not the launch's."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process so far: CUDA's allocator peak on a GPU, else peak RSS."""
    if "cuda" in device:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------
# Distributed: one rank does a job first (a download, a dataset), the others then reuse it


@contextmanager
def rank0_first():
    """`with rank0_first(): prepare()` under torchrun: rank 0 runs the block while the other
    ranks wait at a barrier, then they run it (finding rank 0's files) while rank 0 waits.
    An error on rank 0 still releases the others, who then fail on their own copy of it.
    Outside a process group it is a plain block."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if active else 0
    if active and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and rank == 0:
            dist.barrier()


def atomic_write(path, write):
    """write(tmp) fills a temp file beside path, which is then renamed to path: a kill at any
    moment leaves the old file or the new one, never half of one (per-process name: DDP ranks).
    A read-only folder or a full disk is one NanoError line, and the old file stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError("unexpected pos ...")
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error(path: Path, error: Exception) -> Exception:
    """The one line for a failed write (a full disk, a read-only folder), or the error itself."""
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if getattr(error, "errno", None) == errno.ENOSPC or (isinstance(error, RuntimeError) and free < 64 << 20):
        return NanoError(f"no space left on device writing {path} (free {free >> 20} MB; free some space or "
                         "write elsewhere)")
    if isinstance(error, OSError):
        return NanoError(f"cannot write {path} ({error.strerror or error}; pick a writable path)")
    return error


class MetricsLog:
    """A run's metrics.jsonl, one JSON row per line, flushed as it goes. The rows go to
    metrics.jsonl.new (plot.py reads it live) and replace metrics.jsonl only when the run ends
    well: a run that dies (a full disk, Ctrl-C) never destroys the last good run's log.
    `resume_iter`: a resumed run keeps the rows up to its checkpoint's iteration (a killed run may
    have logged past it) and appends. `tracker` (wandb | mlflow | tensorboard) also sends each row
    and, once, the run's `config` to an experiment tracker (`Tracker`). `active=False` (a DDP rank
    other than 0) logs nothing."""

    def __init__(self, path, tracker="none", config=None, resume_iter=None, active=True):
        self.path, self.file, self.tracker = Path(path), None, None
        if not active:
            return
        self.live = self.path.with_name(self.path.name + ".new")
        kept = rows_up_to(self.live if self.live.is_file() else self.path, resume_iter)
        self.tracker = Tracker(tracker, self.path.parent, config) if tracker != "none" else None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.live, "w", encoding="utf-8")
            self.file.write("".join(line + "\n" for line in kept))
        except OSError as e:
            raise write_error(self.live, e) from None

    def log(self, row: dict):
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(self.live, e) from None
        if self.tracker:
            self.tracker.log(row)

    def close(self, ok=True):
        if self.file is None:
            return
        self.file.close()
        self.file = None
        if ok:
            os.replace(self.live, self.path)
        if self.tracker:
            self.tracker.close(ok)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.close(ok=kind is None)


def rows_up_to(path: Path, last_iter) -> list[str]:
    """The lines of a metrics file whose "iter" is <= last_iter (torn or foreign lines dropped);
    none when last_iter is None (a new run) or the file is missing."""
    if last_iter is None or not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            it = json.loads(line).get("iter")
        except (ValueError, AttributeError):
            continue
        if isinstance(it, int) and it <= last_iter:
            kept.append(line)
    return kept


# ----------------------------------------------------------------------------------------
# Experiment trackers (--tracker): the rows of metrics.jsonl, sent on as they are written

def import_or_explain(module: str, pip: str, why: str):
    """An optional dependency, imported only when asked for; missing, it is one NanoError line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NanoError(f"{why} needs the {pip} package (pip install {pip})") from None


class Tracker:
    """An experiment tracker fed the numbers of every metrics.jsonl row (text and None stay in
    the file) and the run's config once. Offline by default, so no account or network is needed:
    - wandb: WANDB_MODE=offline unless set; the run lands in OUT/wandb/ (`wandb sync` uploads it);
    - mlflow: a local store OUT/mlruns/ unless MLFLOW_TRACKING_URI is set
      (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri OUT/mlruns`);
    - tensorboard: event files in OUT/tensorboard/ (`tensorboard --logdir OUT/tensorboard`).
    A row's step is its "iter" (or "step"), else its number in the run."""

    def __init__(self, kind: str, out_dir, config: dict | None = None):
        if kind not in TRACKERS[1:]:
            raise NanoError(f"unknown --tracker {kind!r} (one of {', '.join(TRACKERS)})")
        self.kind, self.rows, out_dir, config = kind, 0, Path(out_dir), dict(config or {})
        out_dir.mkdir(parents=True, exist_ok=True)
        if kind == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            wandb = import_or_explain("wandb", "wandb", "--tracker wandb")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanollm"), name=out_dir.resolve().name,
                                  dir=out_dir, config=config, settings=wandb.Settings(console="off", silent=True))
        elif kind == "mlflow":
            import_or_explain("mlflow", "mlflow", "--tracker mlflow")
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):  # mlflow 3 asks for this opt-in to its plain-folder store
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.client = MlflowClient(uri)
            experiment = self.client.get_experiment_by_name("nanollm")
            self.run_id = self.client.create_run(experiment.experiment_id if experiment else
                                                 self.client.create_experiment("nanollm"),
                                                 run_name=out_dir.resolve().name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in config.items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params a call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            import_or_explain("tensorboard", "tensorboard", "--tracker tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            self.writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "))

    def log(self, row: dict):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(row.get("iter", row.get("step", self.rows)))
        self.rows += 1
        if self.kind == "wandb":
            self.run.log(numbers)  # one wandb history row per metrics.jsonl row
        elif self.kind == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()])
        else:
            for k, v in numbers.items():  # float64 scalars: the values read back are the file's
                self.writer.add_scalar(k, v, step, new_style=True, double_precision=True)

    def close(self, ok=True):
        if self.kind == "wandb":
            self.run.finish(exit_code=0 if ok else 1)
            import wandb

            wandb.teardown()  # its service writes the run file after finish(): wait for it
        elif self.kind == "mlflow":
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        else:
            self.writer.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temps(path, tags=("tmp",)) -> list[tuple[Path, int]]:
    """(temp, pid) for what atomic writes of `path` by processes no longer alive left behind (a
    kill -9 mid-save): `.NAME.tmp<PID>` files or folders (and `.NAME.old<PID>` of folder swaps)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{'|'.join(tags)})(\d+)")
    found = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*") if path.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            found.append((p, int(m.group(1))))
    return found


def remove_stale_temps(path, tags=("tmp",)):
    for p, pid in stale_temps(path, tags):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        print(f"removed {p}, left by an interrupted run (pid {pid} is gone)")


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_out_dir(out_dir):
    """Before any work: --out_dir must be a folder, or a path a folder can be made at."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir() or any(p.is_file() for p in out_dir.parents):
        raise NanoError(f"--out_dir {out_dir} is a file or below one (pick a folder)")


def check_options(cfg, positive=(), non_negative=(), ranges=None):
    """Validate a script's numeric options in one place, before any work: a bad value is one
    NanoError line naming the option (e.g. `--grad_clip -1` must not silently ascend)."""
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise NanoError(f"--{name} must be positive (got {getattr(cfg, name)})")
    for name in non_negative:
        if not getattr(cfg, name) >= 0:
            raise NanoError(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    for name, (lo, hi) in (ranges or {}).items():
        if not lo <= getattr(cfg, name) <= hi:
            raise NanoError(f"--{name} must be in [{lo}, {hi}] (got {getattr(cfg, name)})")


# ----------------------------------------------------------------------------------------
# Downloads: data.py's datasets and hf_io.py's model folders


def nanollm_cache() -> Path:
    """Where downloads and restored tokenizers go (read at call time: HOME may change)."""
    return Path.home() / ".cache" / "nanollm"


def download(url: str, dest, expected_size: int | None = None, hint: str = "check the network",
             headers: dict | None = None) -> Path:
    """Stream url to dest through a temp file, so an interrupted download never looks
    complete; the size is checked against expected_size or the server's Content-Length."""
    dest = Path(dest)
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    import requests  # imported here: only downloads need it

    print(f"downloading {url} -> {dest}", file=sys.stderr)
    # identity encoding, so Content-Length counts the bytes we write (not gzip's)
    headers = {"Accept-Encoding": "identity", **(headers or {})}

    def fetch(tmp):
        with requests.get(url, stream=True, timeout=60, headers=headers) as r:
            r.raise_for_status()
            expected = expected_size or int(r.headers.get("Content-Length", 0))
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        got = tmp.stat().st_size
        if expected and got != expected:
            raise NanoError(f"{url} arrived with {got} of {expected} bytes (run again)")

    try:
        atomic_write(dest, fetch)  # a per-process temp file: DDP ranks may race
    except requests.RequestException as e:
        raise NanoError(f"could not download {url} ({e.__class__.__name__}; {hint})") from None
    return dest
