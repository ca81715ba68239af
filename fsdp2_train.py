"""FSDP2: train a GPT or a Llama-family model sharded across GPUs with fully_shard, the
whole model or (Q)LoRA.

Fully Sharded Data Parallel (ZeRO stage 3: Rajbhandari et al. 2020, arXiv:1910.02054;
PyTorch FSDP: Zhao et al. 2023, arXiv:2304.11277) is data parallelism in which no rank
holds the whole model: every parameter, its gradient and its optimizer state are cut
along dim 0 into world_size pieces and rank r keeps piece r. FSDP2 (`fully_shard`,
torch.distributed.fsdp) represents each piece as a DTensor with placement Shard(0) and
moves a whole group of parameters with one collective. Here one group per transformer
block, plus the root group (embeddings, final norm, lm_head: GPT-2 ties it to the token
embedding, Llama 3 8B has its own). gpt.py gives GPT-2 and the Llama family (Llama, Qwen2/3,
Mistral from a Hugging Face folder) the same module tree, transformer.h[i] a block, so the
same cut serves both; only the Linears inside a block differ (lora.DEFAULT_TARGETS).

What each rank holds around one block's forward (world size N, bf16 mixed precision):
- before: its 1/N shard of every parameter of the block (fp32 for --mode full; for QLoRA
  1/N of the packed NF4 bytes, 1/N of the uint8 absmax codes and 1/N of the fp32 LoRA A/B;
  the fp32 double-quant scales, 4 bytes per 16384 weights, are replicated buffers), plus
  the gradient shards and AdamW moments of its trainable shards only.
- during: a pre-forward hook all-gathers the shards into full, ordinary tensors (floats
  cast to bf16 on the way by MixedPrecisionPolicy; uint8 tensors are not floats, so the NF4
  bytes arrive bit-exact) and the block's own forward runs on them. QLoRA gathers ~0.52
  byte per base weight and dequantizes each matrix on the fly for its matmul. On GPUs the
  next block's all-gather runs on its own stream while this one computes.
- after: a post-forward hook frees the gathered tensors (reshard_after_forward): the shards
  and the activations saved for backward remain (with --activation_checkpointing only the
  block's input). In backward the block is gathered again, its gradients computed and
  reduce-scattered (averaged over ranks, in fp32) into the gradient shards; frozen tensors
  (the NF4 base) get no gradient and no reduce-scatter.
The root group stays gathered from its forward to the end of backward: the lm_head weight
is the first one the backward of the loss needs.

--hsdp: a 2-D mesh (replicate x shard): shards within a node, copies across nodes, so the
all-gathers stay on the fast intra-node links. Gradient accumulation syncs (reduce-scatters)
only after the last micro-step; before that each rank sums unsharded gradients. Clipping
takes the norm of the DTensor gradients, i.e. over all shards. --cpu_offload keeps
shards, gradients and AdamW state in CPU memory (the optimizer step runs on the CPU).

Determinism across world sizes: every rank builds or loads the same full model (fp32, on
CPU, then shards it: simple and exact, but 8 ranks loading Llama 3 8B hold 8 x 32 GB of host
memory for a moment; a model too big for that would be built on the meta device instead
and each rank would read only its shards) and draws the same *global* batch
(--batch_size) with one generator seeded by --seed, keeping its slice of rows. Per-rank
mean losses, averaged by the reduce-scatter, equal the mean over the global batch, so the
same command under 1 or 8 processes trains on the same samples in the same order and
gives the same losses up to float rounding (dropout > 0 draws different masks per rank).

Checkpoints: sharded, with torch.distributed.checkpoint (DCP): each rank writes its own
shards of model + optimizer to out_dir/ckpt_dcp/ (a filesystem all nodes share), and
--resume reads them back on any world size (DCP reshards); its .metadata is unpickled
admitting only DCP's own metadata classes (no code runs from a planted file), and a save
killed at any moment leaves the newest complete checkpoint for --resume to find. --export writes one full,
unsharded checkpoint in nanollm's format (gpt.save_checkpoint) that sample.py and
eval_hellaswag.py read; for lora and qlora it is the *merged* model (the NF4 base
dequantized to fp32, + scaling * B @ A), a plain GPT. Logs come from rank 0: the global
loss, global tokens/s, MFU per GPU (6N FLOPs per token as nanoGPT counts, also for
(Q)LoRA, whose frozen weights skip the weight-gradient matmuls), peak memory of every rank.
Bad input: one line from rank 0 and every rank exits (torchrun then adds its own report).

--init_from takes a nanollm checkpoint, a GPT-2 size, or a Hugging Face model folder or hub
name (gpt.load_pretrained: config.json says the architecture); the text is then tokenized
with the model's own tokenizer (its tokenizer.json), so --dataset names the text only.

Run:
  python fsdp2_train.py --device cpu                              # one process
  torchrun --nproc_per_node=2 fsdp2_train.py --device cpu         # 2 ranks on CPU (gloo)
  torchrun --nproc_per_node=8 fsdp2_train.py --dataset shakespeare --init_from gpt2 \\
      --mode qlora --block_size 512 --batch_size 32 --export out-fsdp2/ckpt.pt
  torchrun --nproc_per_node=8 fsdp2_train.py --init_from meta-llama/Llama-3.1-8B --mode qlora \\
      --dataset text:corpus.txt --block_size 2048 --batch_size 16 --learning_rate 2e-4 \\
      --activation_checkpointing True --export out-fsdp2/llama.pt   # HF_TOKEN set (gated)
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      fsdp2_train.py --hsdp True ...                              # shard in a node, replicate across
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

import common
from common import NanoError, cli
import data
import gpt
import hf_io
import lora
import qlora_nf4


# ----------------------------------------------------------------------------------------
# The idea: one fully_shard group per transformer block, then the root


def shard_model(model, mesh, cfg: FSDP2Config, param_dtype):
    """fully_shard each block (one all-gather / reduce-scatter group per block: GPT-2's and
    the Llama family's alike), then the root, which takes every parameter not yet in a
    group (embeddings, ln_f, lm_head)."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    for block in model.transformer.h:
        wrap_block_forward(block, cfg.activation_checkpointing, cfg.compile)
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=False)
    return model


def wrap_block_forward(block, checkpointing: bool, compile: bool):
    """Activation checkpointing and torch.compile go *inside* the block's forward; FSDP2's
    all-gather/free hooks stay outside on the module call. Module and parameter names are
    untouched, so checkpoints do not change with these options."""
    forward = block.forward
    if checkpointing:
        inner = forward

        def forward(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
    if compile:
        forward = torch.compile(forward)
    block.forward = forward


# ----------------------------------------------------------------------------------------
# Options


@dataclass
class FSDP2Config(common.TrainingConfig):  # train.py's options (common.py), and these
    # model
    init_from: str = field(default="scratch", metadata={"help": "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | path/to/ckpt.pt | a Hugging Face folder or hub name (Llama, Qwen2/3, Mistral, GPT-2)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt_dcp on any world size (same as --init_from resume)"})
    # what is trained
    mode: str = field(default="full", metadata={"help": "full (every weight) | lora (frozen base + adapters) | qlora (frozen NF4 base + adapters)"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = field(default=0.0, metadata={"help": "> 0 makes the run depend on the world size (per-rank masks)"})
    lora_targets: str = field(default="", metadata={"help": "comma-separated Linear names to adapt (empty: every attention and MLP projection of the architecture, as lora.py picks them)"})
    nf4_blocksize: int = field(default=64, metadata={"help": "weights per NF4 absmax block (qlora)"})
    # FSDP2
    hsdp: bool = field(default=False, metadata={"help": "2-D mesh: shard within groups of hsdp_shard_size ranks, replicate across them"})
    hsdp_shard_size: int = field(default=0, metadata={"help": "ranks per shard group with --hsdp (0: LOCAL_WORLD_SIZE, one node)"})
    reshard_after_forward: bool = field(default=True, metadata={"help": "free gathered block weights after forward (False: keep them until backward, more memory, less communication)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "keep only each block's input, recompute the block in backward"})
    cpu_offload: bool = field(default=False, metadata={"help": "keep parameter/gradient/optimizer shards in CPU memory (CPUOffloadPolicy; CUDA only)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each block's forward"})
    # optimisation: batch_size is the GLOBAL micro-batch, split across ranks
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-step summed over all ranks (must divide by the world size)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per iteration (each rank does all of them)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (over all shards) to this (0 = off)"})
    # checkpoints
    out_dir: str = "out-fsdp2"
    export: str = field(default="", metadata={"help": "at the end, write a full single-file checkpoint here (lora/qlora: merged)"})
    # system
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (each rank takes cuda:LOCAL_RANK)"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 (FSDP2 param dtype; reduce in float32)"})


# what a resumed run takes from the checkpoint; given on the command line, it must agree
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias")  # of the model (GPTConfig)
RUN_KEYS = ("mode", "lora_r", "lora_alpha", "lora_targets", "nf4_blocksize")  # of the run
CKPT_DIR = "ckpt_dcp"


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then flat (train.py's)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    return common.cosine_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)


# ----------------------------------------------------------------------------------------
# Process group, and errors that end every rank


@dataclass
class Ranks:
    rank: int
    world: int
    local_world: int
    device: str
    created_group: bool  # this main() made the process group, so it also destroys it


def init_distributed(device_name: str) -> Ranks:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a 1-rank group, so the
    same code path (and the same sharded checkpoints) serve a single process."""
    use_cuda = torch.cuda.is_available() and (device_name == "auto" or device_name.startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        # cpu:gloo next to cuda:nccl lets small CPU-side collectives (DCP's planning) use gloo
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        # gloo: a rank that died or left early stops the others after 5 minutes, not 30
        timeout = None if use_cuda else datetime.timedelta(minutes=5)
        try:
            if "RANK" in os.environ:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        except RuntimeError as e:  # gloo binds to an interface even for one rank: none up (a sandbox)
            reason = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # past gloo's [file:line] prefix
            raise NanoError(f"the process group could not start ({reason}; is the loopback interface up? "
                            "`ip link set lo up`)") from None
        created = True
    world = dist.get_world_size()
    return Ranks(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), device, created)


def fail(ranks: Ranks, message: str):
    """Every rank calls this on the same condition (so the barrier below cannot hang): rank
    0 prints the one-line error, the others exit quietly, all with status 1. torchrun stops
    the remaining ranks as soon as one exits non-zero, so rank 0 prints *before* the
    barrier that lets the others go; a single process raises NanoError(message) as usual."""
    if ranks.world == 1:
        raise NanoError(message.removeprefix("error: "))
    if ranks.rank == 0:
        print(message, file=sys.stderr, flush=True)
    dist.barrier()
    raise SystemExit(1)


def agree(ranks: Ranks, fn):
    """Run fn on rank 0 first (downloads, tokenizing), the others wait, then run it too
    (reusing what rank 0 wrote). If fn raises NanoError on rank 0, every rank exits with
    rank 0's message instead of hanging at a barrier. Returns this rank's fn()."""
    status, result = [None], None
    if ranks.rank == 0:
        try:
            result = fn()
        except NanoError as e:
            status = [f"error: {e}"]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        fail(ranks, status[0])
    return result if ranks.rank == 0 else fn()


# ----------------------------------------------------------------------------------------
# Model: the same full model on every rank, then sharded


def read_pretrained(init_from: str):
    """(model, tokenizer spec) of --init_from: a nanollm checkpoint file, or a GPT-2 size, a
    Hugging Face folder or hub name (gpt.load_pretrained: config.json says the architecture,
    a hub name is downloaded). In fp32 whatever the file holds (Llama ships bf16): these are
    the master weights FSDP2 shards; MixedPrecisionPolicy casts the gathered copies to bf16."""
    if Path(init_from).is_file():
        model, spec = gpt.load_checkpoint(init_from)
    else:
        model, spec = gpt.load_pretrained(init_from, dtype=torch.float32)
    return model.float(), spec


def build_model(cfg: FSDP2Config, vocab_size: int, device: str, compute_dtype: torch.dtype,
                resume_config: dict | None = None, pretrained=None):
    """The full, unsharded model exactly as a 1-process run builds it, so the sharded run is
    a function of the seed and --init_from alone: random weights from the seed in the shape
    of the command line (scratch) or of the resumed checkpoint (DCP overwrites them later),
    else the pretrained (model, spec) given or read here; then adapted for --mode. Returns
    (model, tokenizer spec of the pretrained model, or None)."""
    if pretrained is None and resume_config is None and cfg.init_from != "scratch":
        pretrained = read_pretrained(cfg.init_from)
    common.set_seed(cfg.seed)  # the random weights, or only the adapters' of a pretrained base
    if pretrained is not None:
        model, spec = pretrained
    elif resume_config is not None:
        model, spec = gpt.GPT(gpt.GPTConfig(**resume_config)), None
    else:
        model, spec = gpt.GPT(gpt.GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                                            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                                            bias=cfg.bias)), None
    return adapt_model(model, cfg, device, compute_dtype), spec


def adapt_model(model, cfg: FSDP2Config, device: str, compute_dtype: torch.dtype):
    """--mode qlora: every Linear but lm_head to NF4 (GPT-2's 4 per block, Llama's 7);
    lora/qlora: adapters on --lora_targets (default: lora.py's projections of the
    architecture, lora.DEFAULT_TARGETS[arch]), everything else frozen."""
    if cfg.mode == "qlora":
        # block by block on the device (Triton's quantizer on CUDA): the full-precision
        # model never sits whole on the GPU; lm_head (GPT-2: the tied embedding) stays as it is
        for block in model.transformer.h:
            qlora_nf4.quantize_model(block.to(device), blocksize=cfg.nf4_blocksize, compute_dtype=compute_dtype)
        shardable_nf4_stats(model)
    if cfg.mode in ("lora", "qlora"):
        lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, lora_targets(cfg))
    return model


def lora_targets(cfg):
    """The names given, or None: lora.apply_lora then picks the architecture's projections."""
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()) or None


def shardable_nf4_stats(model):
    """FSDP2 shards parameters, not buffers. Linear4bit keeps its packed NF4 bytes as a
    frozen uint8 parameter (sharded) and its statistics as buffers (replicated on every
    rank). The uint8 absmax codes (1 byte per 64 weights) become frozen parameters here, so
    they are sharded too; mixed precision leaves non-float parameters alone, so their bytes
    are gathered exactly. The fp32 per-256-block scales and the offset (4 bytes per 16384
    weights) stay buffers: replicated, and never cast to bf16 by the param_dtype policy."""
    for m in model.modules():
        if isinstance(m, qlora_nf4.Linear4bit) and m.absmax.dtype == torch.uint8 and "absmax" in m._buffers:
            m.absmax = nn.Parameter(m._buffers.pop("absmax"), requires_grad=False)


def local_param_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's shards, bytes of the full tensors) over all parameters."""
    local = full = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.numel() * t.element_size()
        full += p.numel() * p.element_size()
    return local, full


# ----------------------------------------------------------------------------------------
# Data: one global batch per micro-step, drawn identically on every rank


def local_batch(bins, cfg: FSDP2Config, generator, ranks: Ranks):
    """Every rank draws the same global batch (B, T) with the shared generator and keeps
    rows [rank * B / N, (rank + 1) * B / N): the data order does not depend on N."""
    x, y = bins.get_batch(cfg.batch_size, cfg.block_size, generator, "cpu")
    per_rank = cfg.batch_size // ranks.world
    rows = slice(ranks.rank * per_rank, (ranks.rank + 1) * per_rank)
    x, y = x[rows], y[rows]
    if ranks.device.startswith("cuda"):
        return x.pin_memory().to(ranks.device, non_blocking=True), y.pin_memory().to(ranks.device, non_blocking=True)
    return x, y


def all_mean(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    value = value.detach().float().clone()
    dist.all_reduce(value)  # SUM: gloo has no AVG
    return value / ranks.world


@torch.no_grad()
def estimate_loss(model, bins, cfg, ranks):
    """Mean loss over eval_iters global batches per split, the same batches every time."""
    model.eval()
    out = {}
    for split, split_bins in bins.items():
        g = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters, device=ranks.device)
        for k in range(cfg.eval_iters):
            x, y = local_batch(split_bins, cfg, g, ranks)
            losses[k] = model(x, y)[1]
        out[split] = all_mean(losses.mean(), ranks).item()
    model.train()
    return out


# ----------------------------------------------------------------------------------------
# Checkpoints: sharded DCP for resuming, one full file for everything else


def check_checkpoint_fits(ranks, path: Path, state: dict):
    """Compare the checkpoint's tensor names and global shapes with this run's before any
    rank starts loading, so a mismatch is one line, not a hang inside DCP."""
    saved = SafeReader(str(path)).read_metadata().state_dict_metadata
    for prefix in ("model", "optim"):
        for name, value in _flat(state[prefix], prefix):
            if not torch.is_tensor(value):
                continue
            if name not in saved:
                fail(ranks, f"error: checkpoint {path} has no tensor {name} (saved with another --mode, "
                            f"--lora_r or model shape; resume with the options of the run that wrote it)")
            size = tuple(getattr(saved[name], "size", ()))
            if size != tuple(value.shape):
                fail(ranks, f"error: checkpoint {path} holds {name} of shape {size}, this run builds "
                            f"{tuple(value.shape)} (resume with the model options of the run that wrote it)")


def _flat(tree, prefix):
    """(dotted name, leaf) pairs the way DCP names nested state-dict entries."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}.{i}")
    else:
        yield prefix, tree


# What a DCP .metadata file may name. DCP reads it with plain pickle.load, which runs any
# callable the file names (a planted `os.system` would run on --resume): this unpickler
# admits only the classes DCP itself writes there, and torch dtypes and Size.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout by name (torch.strided), as torch.load allows
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _DCP_METADATA_CLASSES.get(module, ()) or (
                module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata is read by _MetadataUnpickler (tensor shards are raw
    bytes, and DCP already reads the other objects with torch.load(weights_only=True))."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# save_dcp writes CKPT_DIR.tmp, renames CKPT_DIR to CKPT_DIR.old, CKPT_DIR.tmp to CKPT_DIR,
# then deletes CKPT_DIR.old. A folder is complete once its train_state.json exists (written
# last, atomically; deleted first when a folder is removed), so a kill at any moment leaves
# at least the newest complete checkpoint under one of the three names.
CKPT_NAMES = (CKPT_DIR, CKPT_DIR + ".tmp", CKPT_DIR + ".old")


def read_train_state(folder: Path) -> dict | None:
    """The train_state.json of a complete checkpoint folder, None if the folder is incomplete."""
    state_file = folder / "train_state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        state["iter_num"], state["model_config"], state["config"]  # the keys resume needs
    except (ValueError, KeyError, TypeError) as e:
        raise NanoError(f"checkpoint {folder}: train_state.json is damaged ({type(e).__name__}: {e}; "
                        "restore it or train afresh in another --out_dir)") from None
    return state


def remove_checkpoint(folder: Path):
    (folder / "train_state.json").unlink(missing_ok=True)  # first: the folder is now incomplete
    shutil.rmtree(folder, ignore_errors=True)


def finish_interrupted_save(out_dir: Path):
    """Rank 0, before resuming: keep the newest complete checkpoint, as out_dir/CKPT_DIR."""
    found = [(state["iter_num"], folder) for folder in (out_dir / n for n in CKPT_NAMES)
             if (state := read_train_state(folder)) is not None]
    final = out_dir / CKPT_DIR
    if found:
        newest = max(found, key=lambda f: f[0])[1]
        if newest != final:
            remove_checkpoint(final)
            os.replace(newest, final)
    for name in CKPT_NAMES[1:]:
        remove_checkpoint(out_dir / name)


def save_dcp(ranks, out_dir: Path, model, optimizer, train_rng, train_state: dict):
    """Each rank writes its shards; the folder replaces the previous one only when complete."""
    final, tmp, old = (out_dir / n for n in CKPT_NAMES)
    if ranks.rank == 0:
        remove_checkpoint(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "train_rng": train_rng.get_state()}, checkpoint_id=str(tmp))
    if ranks.rank == 0:  # dcp.save has returned: every rank's shards and .metadata are written
        (tmp / "train_state.json.part").write_text(json.dumps(train_state, indent=1))
        os.replace(tmp / "train_state.json.part", tmp / "train_state.json")
        remove_checkpoint(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        remove_checkpoint(old)
    dist.barrier()


def load_dcp(ranks, path: Path, model, optimizer, train_rng):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "train_rng": train_rng.get_state()}
    try:  # a damaged file fails on every rank alike (DCP gathers the readers' errors to all)
        check_checkpoint_fits(ranks, path, state)
        dcp.load(state, storage_reader=SafeReader(str(path)))
    except (CheckpointException, pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, NanoError):
            raise
        if isinstance(e, CheckpointException):  # the first failing rank's own error
            e = next(iter(e.failures.values()))[0]
        what = ": ".join([type(e).__name__] + str(e).strip().splitlines()[:1])[:200]
        fail(ranks, f"error: checkpoint {path} is damaged ({what}; "
                    "restore it or train afresh in another --out_dir)")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_rng.set_state(state["train_rng"])


def export_checkpoint(ranks, path, model, cfg: FSDP2Config, model_config, spec, step):
    """Gather the full state dict onto rank 0's CPU and write it as a plain GPT checkpoint.
    lora: adapters merged into the base weights (lora.merge_lora). qlora: each NF4 base is
    dequantized to fp32 first (qlora_nf4.dequantize), then merged, so the file computes
    what the trained QLoRA model computes; it is not a merge into the original
    full-precision weights, which this run never held. The adapter alone: lora.save_lora."""
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ranks.rank == 0:
        with torch.device("meta"):  # structure only: the gathered tensors are assigned below
            replica = gpt.GPT(gpt.GPTConfig(**model_config))
            if cfg.mode in ("lora", "qlora"):
                lora.apply_lora(replica, cfg.lora_r, cfg.lora_alpha, 0.0, lora_targets(cfg))
        if cfg.mode == "qlora":  # packed bytes + statistics -> the fp32 weight they encode
            for key in [k for k in full_sd if k.endswith(".absmax")]:
                prefix = key.removesuffix("absmax")
                state = qlora_nf4.QuantState(replica.get_parameter(prefix + "weight").shape, torch.float32,
                                             cfg.nf4_blocksize, full_sd.pop(key), full_sd.pop(prefix + "nested_absmax", None),
                                             full_sd.pop(prefix + "offset", None))
                full_sd[prefix + "weight"] = qlora_nf4.dequantize(full_sd[prefix + "weight"], state, torch.float32)
        replica.load_state_dict(full_sd, assign=True)
        replica.tie_weights()  # assign=True loads a tied pair's two names as two tensors (Llama 3 8B: untied)
        if cfg.mode in ("lora", "qlora"):
            lora.merge_lora(replica)
        gpt.save_checkpoint(path, replica, spec, step=step, fsdp2_mode=cfg.mode)
    dist.barrier()


# ----------------------------------------------------------------------------------------
# The run


def parse_args(argv):
    cfg = common.parse_config(FSDP2Config, argv, __doc__)
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if cfg.init_from == "resume":
        cfg.resume = True
    return cfg, given


def check_outputs(cfg: FSDP2Config):
    """out_dir must be a folder and --export a file, both writable where they are: checked
    before training, not found out at the first save or after the last step."""
    common.check_out_dir(cfg.out_dir)
    if cfg.export:
        export = Path(cfg.export)
        if export.is_dir() or cfg.export.endswith(os.sep):
            raise NanoError(f"--export {export} is a folder (give a file name, e.g. {export / 'ckpt.pt'})")
        if any(p.is_file() for p in export.parents):
            raise NanoError(f"--export {export} is below a file (pick a path in a folder)")


def validate(cfg: FSDP2Config, ranks: Ranks):
    """Bad input: one line from rank 0, every rank exits, before any long work."""
    if cfg.mode not in ("full", "lora", "qlora"):
        fail(ranks, f"error: unknown --mode {cfg.mode!r} (full, lora or qlora)")
    try:
        common.check_options(
            cfg, positive=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                           "max_iters", "learning_rate", "lr_decay_iters", "eval_interval", "eval_iters",
                           "log_interval", "lora_r", "nf4_blocksize"),
            non_negative=("min_lr", "warmup_iters", "weight_decay", "grad_clip", "hsdp_shard_size", "peak_flops"),
            ranges={"dropout": (0.0, 0.99), "lora_dropout": (0.0, 0.99), "beta1": (0.0, 0.9999), "beta2": (0.0, 0.9999)})
        check_outputs(cfg)
    except NanoError as e:
        fail(ranks, f"error: {e}")
    if not (cfg.init_from in ("scratch", "resume") or cfg.init_from in hf_io.GPT2_SIZES
            or Path(cfg.init_from).exists() or hf_io.is_hub_name(cfg.init_from)):  # a hub name is downloaded
        fail(ranks, f"error: unknown --init_from {cfg.init_from!r} (scratch, resume, {', '.join(hf_io.GPT2_SIZES)}, "
                    "a checkpoint file, a Hugging Face model folder or a hub name like HuggingFaceTB/SmolLM2-135M)")
    if cfg.batch_size % ranks.world:
        fail(ranks, f"error: --batch_size {cfg.batch_size} (the global batch) is not divisible by the world "
                    f"size {ranks.world} (pass a multiple of {ranks.world})")
    if cfg.hsdp:
        shard = cfg.hsdp_shard_size or ranks.local_world
        if ranks.world % shard:
            fail(ranks, f"error: --hsdp shard groups of {shard} ranks do not divide the world size {ranks.world} "
                        "(set --hsdp_shard_size to a divisor)")
    device_type = ranks.device.split(":")[0]
    if cfg.mode == "qlora" and device_type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            fail(ranks, "error: --mode qlora on CUDA needs triton for the NF4 kernels (pip install triton)")
    if cfg.cpu_offload and device_type != "cuda":
        fail(ranks, "error: --cpu_offload moves shards between GPU and CPU memory; it needs --device cuda")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        fail(ranks, f"error: --dtype {cfg.dtype} is not supported with FSDP2 here (auto, float32 or bfloat16; "
                    "float16 would need a sharded grad scaler)")
    if cfg.dtype == "auto" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        fail(ranks, "error: this GPU has no bfloat16 (pass --dtype float32)")


def resume_options(cfg: FSDP2Config, given: set, ranks: Ranks) -> dict:
    """nanoGPT-style resume: the model shape and LoRA/QLoRA settings come from the checkpoint;
    an option given on the command line must agree with it."""
    path = Path(cfg.out_dir) / CKPT_DIR
    try:
        with common.rank0_first():  # the others read what rank 0 left
            if ranks.rank == 0:
                finish_interrupted_save(Path(cfg.out_dir))
            state = read_train_state(path)
    except NanoError as e:  # every rank reads the same damaged file
        fail(ranks, f"error: {e}")
    if state is None:
        fail(ranks, f"error: no checkpoint to resume in {path} (train first, or check --out_dir)")
    for key in SHAPE_KEYS + RUN_KEYS:
        saved = state["model_config"][key] if key in SHAPE_KEYS else state["config"][key]
        if key in given and getattr(cfg, key) != saved:
            fail(ranks, f"error: checkpoint {path} was saved with {key}={saved}, but --{key} {getattr(cfg, key)} "
                        f"was given (drop the option to resume, or use another --out_dir)")
        setattr(cfg, key, saved)
    if "block_size" not in given:  # the training window (the model's own may be longer)
        cfg.block_size = state["config"]["block_size"]
    return state


@cli
def main(argv=None):
    cfg, given = parse_args(argv)
    ranks = init_distributed(cfg.device)
    try:
        if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
            fail(ranks, f"error: --device {cfg.device} is not supported by FSDP2 here (auto, cpu or cuda)")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            fail(ranks, "error: --device cuda but CUDA is not available (use --device cpu)")
        return run(cfg, given, ranks)
    finally:
        if ranks.created_group and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: FSDP2Config, given: set, ranks: Ranks):
    """The stages: check the options, read the data, build and shard the model, the
    optimizer (and the resumed state), train, export."""
    log = (lambda *a: print(*a, flush=True)) if ranks.rank == 0 else (lambda *a: None)
    validate(cfg, ranks)
    dtype = common.pick_dtype(ranks.device, cfg.dtype)
    resume_state = resume_options(cfg, given, ranks) if cfg.resume else None
    # a pretrained model before the data: the text is tokenized with the model's tokenizer
    pretrained = load_init_model(cfg, given, ranks) if not cfg.resume and cfg.init_from != "scratch" else None
    model_spec = resume_state["tokenizer"] if resume_state is not None else pretrained and pretrained[1]
    bins, meta = prepare_data(cfg, ranks, model_spec)
    tokenizer_spec = meta["tokenizer"]
    model, mesh = build_sharded_model(cfg, given, ranks, dtype, meta, resume_state, pretrained, log)
    model_config = asdict(model.config)

    # only trainable shards reach the optimizer: for lora/qlora the adapters, never the base
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           ranks.device.split(":")[0])
    for group in optimizer.param_groups:  # one multi-tensor op for all shards, not ~10 DTensor ops per shard
        group["foreach"] = not group.get("fused")
    train_rng = torch.Generator().manual_seed(cfg.seed)  # its state is the data position
    iter_num, best_val_loss = 0, float("inf")
    ckpt = Path(cfg.out_dir) / CKPT_DIR
    if resume_state is not None:
        load_dcp(ranks, ckpt, model, optimizer, train_rng)
        iter_num, best_val_loss = resume_state["iter_num"], resume_state["best_val_loss"]
        log(f"resumed from {ckpt} at iter {iter_num} (saved by {resume_state['world_size']} ranks)")
    torch.manual_seed(cfg.seed + ranks.rank)  # dropout masks: independent per rank

    def save(iter_num, best_val_loss):
        save_dcp(ranks, Path(cfg.out_dir), model, optimizer, train_rng, {
            "iter_num": iter_num, "best_val_loss": best_val_loss, "world_size": ranks.world,
            "model_config": model_config, "tokenizer": tokenizer_spec, "config": asdict(cfg)})
        log(f"saved sharded checkpoint to {ckpt}")

    iter_num, losses, best_val_loss = train(model, optimizer, bins, train_rng, cfg, ranks, dtype, model_config,
                                            iter_num, best_val_loss, save, log)
    if cfg.export:
        export_checkpoint(ranks, cfg.export, model, cfg, model_config, tokenizer_spec, iter_num)
        log(f"exported full checkpoint ({'merged ' + cfg.mode if cfg.mode != 'full' else 'full model'}) to {cfg.export}")
    return {"iter": iter_num, "losses": losses, "best_val_loss": best_val_loss, "model": model,
            "optimizer": optimizer, "mesh": mesh}


def prepare_data(cfg: FSDP2Config, ranks: Ranks, model_spec: str | None):
    """Rank 0 tokenizes, the others wait (and learn of its failure). model_spec, the tokenizer
    of a pretrained or resumed model, is the one the text is tokenized with; a character
    alphabet is the text's own (shakespeare_char), so that one is checked, not imposed.
    Returns the train/val token bins and the dataset's meta.json (tokenizer spec, vocabulary size)."""
    tokenizer = None if model_spec is None or model_spec.startswith("char:") else model_spec
    if tokenizer is not None and cfg.dataset == "shakespeare_char":
        fail(ranks, f"error: --dataset shakespeare_char is character-level, the model reads tokens of {tokenizer!r} "
                    "(use --dataset shakespeare, text:<path> or fineweb_edu, tokenized with the model's tokenizer)")
    data_dir = agree(ranks, lambda: data.prepare_dataset(cfg.dataset, cfg.input or None, tokenizer, cfg.data_root))
    meta = data.read_meta(data_dir)
    bins = {"train": data.TokenBins(data_dir, "train"), "val": data.TokenBins(data_dir, "val")}
    if model_spec is not None and model_spec != meta["tokenizer"]:
        fail(ranks, f"error: the model reads tokenizer {model_spec!r}, --dataset {cfg.dataset} uses "
                    f"{meta['tokenizer']!r} (pick the dataset the model was trained on)")
    for split, b in bins.items():
        if (b.sizes - cfg.block_size - 1).clamp(min=0).sum() == 0:
            fail(ranks, f"error: the {split} data is shorter than block_size + 1 = {cfg.block_size + 1} tokens "
                        "(use a smaller --block_size or more text)")
    return bins, meta


def load_init_model(cfg: FSDP2Config, given: set, ranks: Ranks):
    """--init_from's (model, tokenizer spec) on every rank (rank 0 first: it may download),
    checked before any text is tokenized: it brings its tokenizer, and a shape option given
    on the command line agrees with it."""
    model, spec = agree(ranks, lambda: read_pretrained(cfg.init_from))
    if spec is None:
        fail(ranks, f"error: --init_from {cfg.init_from} has no tokenizer (the data is tokenized with the "
                    "model's own: put its tokenizer.json in the folder)")
    for key in SHAPE_KEYS:
        if key in given and getattr(cfg, key) != getattr(model.config, key):
            fail(ranks, f"error: --init_from {cfg.init_from} has {key}={getattr(model.config, key)}, but --{key} "
                        f"{getattr(cfg, key)} was given (the model's shape wins: drop the option)")
    return model, spec


def build_sharded_model(cfg, given: set, ranks: Ranks, dtype, meta: dict, resume_state, pretrained, log):
    """The same full model on every rank (built, or the pretrained one each rank loaded),
    adapted for the mode, checked against the data, then cut into shards on a 1-D (FSDP) or
    2-D (HSDP) mesh."""
    resume_config = resume_state["model_config"] if resume_state is not None else None
    model, _ = agree(ranks, lambda: build_model(cfg, meta["vocab_size"], ranks.device, dtype, resume_config, pretrained))
    if meta["vocab_size"] > model.config.vocab_size:
        fail(ranks, f"error: the data has {meta['vocab_size']} token ids, the model only {model.config.vocab_size}")
    if cfg.block_size > model.config.block_size:
        fail(ranks, f"error: --block_size {cfg.block_size} exceeds the model's {model.config.block_size}")

    device_type = ranks.device.split(":")[0]
    if cfg.hsdp:
        shard = cfg.hsdp_shard_size or ranks.local_world
        mesh = init_device_mesh(device_type, (ranks.world // shard, shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (ranks.world,), mesh_dim_names=("shard",))
    shard_model(model, mesh, cfg, dtype if dtype != torch.float32 else None)
    local_bytes, full_bytes = local_param_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.mode}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameter elements, "
        f"{trainable / 1e6:.3f}M trainable; {ranks.world} ranks ({'HSDP ' + 'x'.join(map(str, mesh.shape)) if cfg.hsdp else 'FSDP'}), "
        f"rank 0 holds {local_bytes / 2**20:.2f} of {full_bytes / 2**20:.2f} MiB of parameters; "
        f"device {ranks.device}, param dtype {str(dtype).removeprefix('torch.')}")
    return model, mesh


def train(model, optimizer, bins, train_rng, cfg, ranks, dtype, model_config, iter_num, best_val_loss, save, log):
    """The loop: evaluate (and save) every eval_interval, one optimizer step per iteration
    over gradient_accumulation_steps micro-batches, log every log_interval. Returns
    (last iter, [(iter, global loss)] of the logged iterations, best val loss)."""
    device = ranks.device
    with torch.device("meta"):  # FLOPs are the dense model's (6N per token, nanoGPT's count), whatever the mode
        flops_model = gpt.GPT(gpt.GPTConfig(**model_config))
    peak_flops = common.device_peak_flops(device, dtype, cfg.peak_flops)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    local_seqs_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size // ranks.world
    log(f"tokens per iteration: {tokens_per_iter:,} ({cfg.batch_size // ranks.world} sequences per rank per micro-step)")
    metrics = common.MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg),
                                resume_iter=iter_num if cfg.resume else None, active=ranks.rank == 0)
    losses, start_iter = [], iter_num
    t_last, iters_since_log, step_times = time.time(), 0, []
    model.train()
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg.eval_interval == 0 and (iter_num != start_iter or start_iter == 0):
            ev = estimate_loss(model, bins, cfg, ranks)
            log(f"iter {iter_num}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
            metrics.log({"iter": iter_num, "train_loss": ev["train"], "val_loss": ev["val"]})
            if iter_num > 0 and (ev["val"] < best_val_loss or cfg.always_save_checkpoint):
                best_val_loss = min(best_val_loss, ev["val"])
                save(iter_num, best_val_loss)
        if iter_num >= cfg.max_iters:  # every stop/save decision uses values equal on all ranks
            break

        # gradient accumulation: reduce-scatter only after the last micro-step's backward;
        # before that, each rank keeps summing unsharded gradients locally
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(cfg.gradient_accumulation_steps):
            model.set_requires_gradient_sync(micro_step == cfg.gradient_accumulation_steps - 1)
            x, y = local_batch(bins["train"], cfg, train_rng, ranks)
            _, loss = model(x, y)
            loss = loss / cfg.gradient_accumulation_steps
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            # the gradients are DTensors: the norm is reduced over all shards (and replicas)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since_log += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            lossf = all_mean(loss_sum, ranks).item()  # the global batch's mean loss
            now = time.time()
            dt = (now - t_last) / iters_since_log
            t_last, iters_since_log = now, 0
            if iter_num - start_iter > 1:  # the first step includes warm-up (and compilation)
                step_times.append(dt)
            mfu = flops_model.estimate_mfu(local_seqs_per_iter, dt, peak_flops)  # per GPU
            losses.append((iter_num, lossf))
            log(f"iter {iter_num}/{cfg.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.1f}%" if mfu else "")
                + f", peak mem/rank {peak_memory_text(ranks)} MiB, eta {dt * (cfg.max_iters - iter_num) / 60:.1f} min")
            metrics.log({"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_step": dt * 1000,
                         "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
    if step_times:
        med = sorted(step_times)[len(step_times) // 2]
        log(f"done: {iter_num} iters, median {med * 1000:.1f} ms/iter, {tokens_per_iter / med:,.0f} tok/s")
    metrics.close()
    return iter_num, losses, best_val_loss


def peak_memory_text(ranks: Ranks) -> str:
    """Every rank's peak memory (MiB), gathered: "a/b/..." for up to 8 ranks, else "min..max"."""
    peaks = torch.tensor([common.peak_memory_mib(ranks.device)], device=ranks.device)
    all_peaks = [torch.zeros_like(peaks) for _ in range(ranks.world)]
    dist.all_gather(all_peaks, peaks)
    all_peaks = [p.item() for p in all_peaks]
    return ("/".join(f"{p:,.0f}" for p in all_peaks) if ranks.world <= 8
            else f"{min(all_peaks):,.0f}..{max(all_peaks):,.0f}")


if __name__ == "__main__":
    main()
