"""Mixture of experts: a GPT whose MLPs are replaced by many experts, each token using a few.

The idea (Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", arXiv:1701.06538): keep the cost per token fixed but hold many
more parameters. A small router scores every token against E expert MLPs; the token is
sent to its top-k experts only and their outputs are summed, weighted by the router's
probabilities. With k of E experts active, compute grows with k, capacity with E.

What this file builds, and where each piece comes from:
- Router: a linear layer run in fp32 (bf16 logits flip the top-k choice), softmax over the
  E experts, top-k, and the k weights renormalised to sum to 1 (Mixtral, Jiang et al. 2024,
  arXiv:2401.04088).
- Two ways to run the experts, neither with a Python loop over tokens:
  dropless: sort the (token, choice) slots by expert, count them with bincount, run each
  expert on its contiguous slice, add the results back with index_add_ (the grouped-GEMM
  layout of MegaBlocks, Gale et al. 2022); every token is served, no row is padding.
  capacity: every expert gets a fixed buffer of ceil(k * capacity_factor * tokens / E) rows;
  slots past it are dropped, and the token passes through the residual connection alone
  (GShard; Switch Transformer, Fedus et al. 2021, arXiv:2101.03961). One bmm runs all experts
  on the (E, capacity, d) buffer, all shapes are static, so torch.compile(fullgraph=True)
  traces it without a graph break. (With the capacity set to the batch's largest load it
  serves every slot too, Tutel's adaptive capacity, but it runs E * max_load rows instead
  of k * tokens: on one CPU thread it measured 6-20% slower than the sorted slices, with 2
  threads on a busy 2-core machine 1.3-1.8x faster (likely: bmm gives each thread whole experts).)
- Losses: the Switch load-balancing loss alpha * E * sum_i f_i * P_i (f_i = fraction of slots
  routed to expert i, P_i = its mean router probability; equals alpha when routing is
  uniform) and the router z-loss mean(logsumexp(logits)^2) that keeps logits small
  (ST-MoE, Zoph et al. 2022, arXiv:2202.08906).
- Auxiliary-loss-free balancing (DeepSeek-V3, 2024, arXiv:2412.19437): a per-expert bias added
  to the scores for the top-k selection only (the weights use the unbiased scores); after
  each optimizer step it moves by -gamma for experts that got more than the mean load and
  +gamma for the others.
- Shared experts that every token uses, beside the routed ones (DeepSeekMoE, Dai et al.
  2024, arXiv:2401.06066). By default the routed experts are fine-grained as there: each has
  4 * n_embd / (top_k + n_shared_experts) hidden units, so the active parameters per token
  equal those of the dense MLP.

MoEGPT is gpt.GPT with the `mlp` of every moe_every-th block swapped for an MoE layer; the
layer returns its output tensor and leaves its aux loss and load statistics on itself, so
gpt.Block's `x + mlp(ln_2(x))` is untouched and the training loop adds `model.aux_loss()`.

Run: python moe.py  (trains an MoE GPT on shakespeare_char, then a dense GPT with the same
active parameters on the same batches, and prints val loss, tokens/s, the expert load per
layer and the dropped-token fraction). Options: python moe.py --help; offline:
python moe.py --input path/to/tinyshakespeare.txt
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import common
from common import NanoError, cli
import data
import gpt

BALANCE_METHODS = ("aux", "bias", "none")


@dataclass
class MoEConfig:
    n_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer (E)"})
    top_k: int = field(default=2, metadata={"help": "experts each token is sent to (k)"})
    capacity_factor: float = field(default=1.25, metadata={
        "help": "capacity path: each expert holds ceil(k * factor * tokens / E) slots"})
    dropless: bool = field(default=True, metadata={
        "help": "True: sort-by-expert path, no token dropped; False: fixed-capacity path"})
    # Our loss counts the N*k routing slots, Hugging Face Mixtral's load_balancing_loss_func the
    # N tokens: ours is exactly 1/k of theirs, so a router_aux_loss_coef copied from a Mixtral
    # config must be multiplied by k here to pull as hard.
    aux_loss_coef: float = field(default=1e-2, metadata={
        "help": "alpha of the Switch load-balancing loss (= HF Mixtral's router_aux_loss_coef times top_k)"})
    z_loss_coef: float = field(default=1e-3, metadata={"help": "coefficient of the router z-loss"})
    n_shared_experts: int = field(default=0, metadata={"help": "experts every token uses (DeepSeekMoE)"})
    balance: str = field(default="aux", metadata={
        "help": "aux: load-balancing loss; bias: DeepSeek-V3 aux-loss-free bias; none"})
    bias_update_rate: float = field(default=1e-3, metadata={"help": "gamma: bias step per optimizer step"})
    expert_hidden: int = field(default=0, metadata={
        "help": "hidden units per expert; 0 = 4*n_embd/(top_k+n_shared_experts), equal active params"})
    renormalize: bool = field(default=True, metadata={
        "help": "renormalise the top-k weights to sum to 1 (Mixtral); False keeps raw probs (Switch)"})

    def __post_init__(self):
        if self.n_experts < 1:
            raise NanoError(f"n_experts must be >= 1 (got {self.n_experts})")
        if not 1 <= self.top_k <= self.n_experts:
            raise NanoError(f"top_k {self.top_k} must be in 1..n_experts={self.n_experts} "
                             "(lower --top_k or raise --n_experts)")
        if not self.capacity_factor > 0:
            raise NanoError(f"capacity_factor must be > 0 (got {self.capacity_factor}; 1.0-2.0 is usual)")
        if self.balance not in BALANCE_METHODS:
            raise NanoError(f"balance {self.balance!r} unknown (one of {', '.join(BALANCE_METHODS)})")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "n_shared_experts", "expert_hidden"):
            if getattr(self, name) < 0:
                raise NanoError(f"{name} must be >= 0 (got {getattr(self, name)})")


# ----------------------------------------------------------------------------------------
# Experts, router and the two dispatch paths


def expert_mlp(x, w_fc, b_fc, w_proj, b_proj):
    """One expert = gpt.MLP's computation with explicit weights (nn.Linear layout, (out, in))."""
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def dropless_moe(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj):
    """Every (token, choice) slot is served. x (N, d), topk_idx/topk_w (N, k); weights
    stacked over experts: w_fc (E, h, d), b_fc (E, h) or None, w_proj (E, d, h), b_proj (E, d)."""
    N, k = topk_idx.shape
    E = w_fc.shape[0]
    flat_expert = topk_idx.reshape(-1)  # (N*k,): slot s is token s // k, choice s % k
    order = flat_expert.argsort(stable=True)  # slots grouped by expert, token order inside
    token_of = order // k
    counts = torch.bincount(flat_expert, minlength=E)  # offsets of each group = counts.cumsum()
    x_sorted = x[token_of]  # (N*k, d), expert e's slots are one contiguous slice
    # unbind once: indexing w_fc[e] E times would make autograd build E zero (E, h, d) grads
    experts = zip(*(t.unbind(0) if t is not None else (None,) * E for t in (w_fc, b_fc, w_proj, b_proj)))
    # one host sync for the slice sizes; the loop is over E experts, never over tokens
    y_sorted = torch.cat([expert_mlp(xs, *weights) for xs, weights in zip(x_sorted.split(counts.tolist()), experts)])
    y_sorted = y_sorted * topk_w.reshape(-1)[order, None]
    return x.new_zeros(N, x.shape[1]).index_add_(0, token_of, y_sorted.to(x.dtype))


def expert_capacity(n_tokens, cfg: MoEConfig):
    """ceil(k * capacity_factor * tokens / E) slots per expert, at most every token once."""
    return min(n_tokens, math.ceil(cfg.top_k * cfg.capacity_factor * n_tokens / cfg.n_experts))


def experts_bmm(buf, w_fc, b_fc, w_proj, b_proj):
    """expert_mlp for all experts at once: buf (E, C, d), block e holds expert e's rows ->
    (E, C, d). One bmm per matmul instead of E; baddbmm adds the bias in the same call."""
    h = torch.bmm(buf, w_fc.mT) if b_fc is None else torch.baddbmm(b_fc[:, None, :], buf, w_fc.mT)  # (E, C, h)
    h = F.gelu(h, approximate="tanh")
    return torch.bmm(h, w_proj.mT) if b_proj is None else torch.baddbmm(b_proj[:, None, :], h, w_proj.mT)


def capacity_moe(x, topk_idx, topk_w, w_fc, b_fc, w_proj, b_proj, capacity):
    """Fixed-size expert buffers (E, capacity, d); returns (y (N, d), kept (k*N,) bool).
    Arguments as dropless_moe's. Priority inside an expert: every token's 1st choice before
    any 2nd choice (GShard), then token order. A dropped slot adds nothing: the token keeps
    only its residual."""
    N, k = topk_idx.shape
    E, d = w_fc.shape[0], x.shape[1]
    expert_of = topk_idx.t().reshape(-1)  # (k*N,) slot-major: choice 0 of all tokens first
    token_of = torch.arange(N, device=x.device).repeat(k)
    onehot = F.one_hot(expert_of, E)  # (k*N, E)
    position = (onehot.cumsum(0) * onehot).sum(1) - 1  # rank of the slot in its expert's queue
    kept = position < capacity
    # row of the slot in the flattened (E*capacity) buffer; dropped slots share a spare last row
    dest = torch.where(kept, expert_of * capacity + position, E * capacity)
    buf = x.new_zeros(E * capacity + 1, d).index_add_(0, dest, x[token_of])
    y = experts_bmm(buf[:-1].view(E, capacity, d), w_fc, b_fc, w_proj, b_proj)  # (E, capacity, d)
    y = torch.cat([y.reshape(E * capacity, d), y.new_zeros(1, d)])  # the spare row gives 0
    y_slots = y[dest] * topk_w.t().reshape(-1, 1)  # (k*N, d), slot-major
    return y_slots.view(k, N, d).sum(0).to(x.dtype), kept  # each token: the sum of its k rows


def load_balancing_loss(probs, topk_idx):
    """Switch Transformer: E * sum_i f_i * P_i; f_i = fraction of the N*k slots sent to expert
    i (not differentiable), P_i = mean router probability of i (carries the gradient).
    Normalised by slots, it is 1/k of HF Mixtral's load_balancing_loss_func (normalised by tokens)."""
    E = probs.shape[1]
    f = F.one_hot(topk_idx.reshape(-1), E).sum(0).float() / topk_idx.numel()
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits):
    """ST-MoE: mean over tokens of logsumexp(logits)^2; large logits make fp rounding in the
    softmax flip expert choices, this keeps them near zero."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    def __init__(self, n_embd, cfg: MoEConfig):
        super().__init__()
        self.top_k, self.renormalize = cfg.top_k, cfg.renormalize
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, n_embd))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x, selection_bias=None):
        """x (N, d) -> logits, probs (N, E) fp32; topk_idx (N, k); topk_w (N, k) fp32."""
        # fp32 even under autocast: a bf16 rounding of the logits changes which experts win
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        scores = probs if selection_bias is None else probs + selection_bias  # bias picks, never weighs
        topk_idx = scores.topk(self.top_k, dim=-1).indices
        topk_w = probs.gather(1, topk_idx)
        if self.renormalize:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        return logits, probs, topk_idx, topk_w


class MoE(nn.Module):
    """Drop-in for gpt.MLP: forward(x (B, T, n_embd)) -> (B, T, n_embd). After each forward:
    self.aux_loss (scalar to add to the loss), self.last_load (E,) slots per expert,
    self.last_dropped (fraction of slots dropped by the capacity path)."""

    def __init__(self, config: gpt.GPTConfig, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.n_embd = cfg, config.n_embd
        E, d = cfg.n_experts, config.n_embd
        h = cfg.expert_hidden or max(1, 4 * d // (cfg.top_k + cfg.n_shared_experts))
        self.expert_hidden = h
        self.router = Router(d, cfg)
        # experts stacked into (E, out, in) tensors: one bmm runs them all on the capacity path
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)  # as gpt.GPT scales c_proj
        self.w_fc = nn.Parameter(torch.randn(E, h, d) * 0.02)
        self.w_proj = nn.Parameter(torch.randn(E, d, h) * resid_std)
        self.b_fc = nn.Parameter(torch.zeros(E, h)) if config.bias else None
        self.b_proj = nn.Parameter(torch.zeros(E, d)) if config.bias else None
        for bias in (self.b_fc, self.b_proj):
            if bias is not None:  # stacked (E, h) biases are biases all the same: no weight decay
                bias.no_weight_decay = True
        if cfg.n_shared_experts:
            # n shared experts of h hidden units = one MLP with n*h (the sum over experts is
            # a sum over hidden units), run on every token
            self.shared_fc = nn.Linear(d, cfg.n_shared_experts * h, bias=config.bias)
            self.shared_proj = nn.Linear(cfg.n_shared_experts * h, d, bias=config.bias)
            nn.init.normal_(self.shared_fc.weight, std=0.02)
            nn.init.normal_(self.shared_proj.weight, std=resid_std)
            for lin in (self.shared_fc, self.shared_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("expert_bias", torch.zeros(E))  # DeepSeek-V3 selection bias
        self.register_buffer("step_load", torch.zeros(E), persistent=False)  # slots since last update
        self.aux_loss = torch.zeros(())
        self.last_load = torch.zeros(E)
        self.last_dropped = torch.zeros(())

    def capacity(self, n_tokens):
        return expert_capacity(n_tokens, self.cfg)

    def forward(self, x):
        if x.shape[-1] != self.n_embd:
            raise NanoError(f"MoE input has n_embd={x.shape[-1]} but the layer was built for "
                             f"{self.n_embd} (build it with the model's GPTConfig)")
        cfg = self.cfg
        x2 = x.reshape(-1, self.n_embd)  # (N, d), N = B*T tokens routed independently
        bias = self.expert_bias if cfg.balance == "bias" else None
        logits, probs, topk_idx, topk_w = self.router(x2, bias)
        weights = (self.w_fc, self.b_fc, self.w_proj, self.b_proj)
        if cfg.dropless:
            y = dropless_moe(x2, topk_idx, topk_w, *weights)
            dropped = torch.zeros((), device=x.device)
        else:
            y, kept = capacity_moe(x2, topk_idx, topk_w, *weights, self.capacity(x2.shape[0]))
            dropped = 1.0 - kept.float().mean()
        if cfg.n_shared_experts:
            y = y + self.shared_proj(F.gelu(self.shared_fc(x2), approximate="tanh"))

        aux = cfg.z_loss_coef * router_z_loss(logits)
        if cfg.balance == "aux":
            aux = aux + cfg.aux_loss_coef * load_balancing_loss(probs, topk_idx)
        load = F.one_hot(topk_idx.reshape(-1), cfg.n_experts).sum(0).float()  # (E,) slots per expert
        self.aux_loss, self.last_load, self.last_dropped = aux, load.detach(), dropped.detach()
        if self.training and cfg.balance == "bias":
            self.step_load += load.detach()
        return self.dropout(y.view(x.shape))

    @torch.no_grad()
    def update_bias(self):
        """DeepSeek-V3: after an optimizer step, lower the bias of overloaded experts and raise
        the others by gamma, from the load seen since the previous update."""
        if self.cfg.balance != "bias" or self.step_load.sum() == 0:
            return
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(self.step_load.mean() - self.step_load)
        self.step_load.zero_()


class MoEGPT(gpt.GPT):
    """gpt.GPT with the MLP of every moe_every-th block (blocks moe_every-1, 2*moe_every-1, ...)
    replaced by an MoE layer; attention, blocks and the loss are gpt.GPT's."""

    def __init__(self, config: gpt.GPTConfig, moe: MoEConfig, moe_every: int = 1):
        super().__init__(config)
        if moe_every < 1:
            raise NanoError(f"moe_every must be >= 1 (got {moe_every})")
        if moe_every > config.n_layer:
            raise NanoError(f"moe_every {moe_every} > n_layer {config.n_layer} leaves no MoE layer "
                             "(lower --moe_every)")
        self.moe_config, self.moe_every = moe, moe_every
        for i, block in enumerate(self.transformer.h):
            if i % moe_every == moe_every - 1:
                block.mlp = MoE(config, moe)

    def moe_layers(self):
        return [(i, b.mlp) for i, b in enumerate(self.transformer.h) if isinstance(b.mlp, MoE)]

    def aux_loss(self):
        """Sum of the MoE layers' aux losses from the last forward (add it to the LM loss)."""
        return sum(m.aux_loss for _, m in self.moe_layers())

    def update_expert_biases(self):
        for _, m in self.moe_layers():
            m.update_bias()

    def num_active_params(self, non_embedding=True):
        """Parameters one token uses: the routed experts it is not sent to are left out."""
        n = self.num_params(non_embedding)
        for _, m in self.moe_layers():
            per_expert = sum(p[0].numel() for p in (m.w_fc, m.b_fc, m.w_proj, m.b_proj) if p is not None)
            n -= (m.cfg.n_experts - m.cfg.top_k) * per_expert
        return n


def save_moe_checkpoint(path, model: MoEGPT, tokenizer_spec, step=0, **extra):
    gpt.save_checkpoint(path, model, tokenizer_spec, step=step, moe=asdict(model.moe_config),
                        moe_every=model.moe_every, **extra)


def load_moe_checkpoint(path, device="cpu"):
    """(model, tokenizer_spec) from a checkpoint written by save_moe_checkpoint."""
    ckpt = gpt.read_checkpoint(path, device)
    if "moe" not in ckpt:
        raise NanoError(f"{path} is a dense checkpoint (load it with gpt.load_checkpoint)")
    model = MoEGPT(gpt.GPTConfig(**ckpt["config"]), MoEConfig(**ckpt["moe"]), ckpt["moe_every"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise NanoError(f"{path} does not match its config ({first})") from None
    return model.to(device), ckpt.get("tokenizer")


# ----------------------------------------------------------------------------------------
# Training: an MoE GPT and a dense GPT of equal active parameters on the same batches


@dataclass
class TrainConfig(MoEConfig):
    moe_every: int = field(default=1, metadata={"help": "every n-th block gets an MoE layer (1 = all)"})
    dataset: str = field(default="shakespeare_char", metadata={"help": "shakespeare_char | shakespeare | text:<path>"})
    input: str | None = field(default=None, metadata={"help": "local copy of the raw text (no download)"})
    data_root: str = "data"
    out_dir: str = "out/moe"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    batch_size: int = 16
    max_iters: int = 500
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = field(default=100, metadata={"help": "steps between val-loss estimates"})
    eval_iters: int = field(default=20, metadata={"help": "val batches per estimate"})
    log_interval: int = 10
    tracker: str = field(**common.tracker_option())
    compare_dense: bool = field(default=True, metadata={"help": "also train the dense GPT and compare"})
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False


def lr_at(step, cfg: TrainConfig):
    """train.py's schedule (common.cosine_lr): linear warmup, cosine decay to min_lr at max_iters."""
    return common.cosine_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)


@torch.no_grad()
def estimate_val_loss(model, bins, cfg: TrainConfig, device, dtype):
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same val batches for every model and eval
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = bins.get_batch(cfg.batch_size, cfg.block_size, gen, device)
        with common.autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def load_bars(load, width=20):
    """Text histogram of one layer's expert load: one bar per expert; `width` characters (up
    to the '|') are the even share 1/E, so a balanced layer's bars all end at the '|'."""
    share = (load / load.sum().clamp(min=1)).tolist()
    lines = []
    for i, s in enumerate(share):
        n = min(3 * width, round(width * s * len(share)))
        bar = ("#" * min(n, width)).ljust(width) + "|" + "#" * max(0, n - width)
        lines.append(f"    e{i:<3d}{bar:<{3 * width + 1}s} {100 * s:5.1f}%")
    return "\n".join(lines)


def train(model, label, cfg: TrainConfig, bins, device, dtype, metrics):
    """The short training loop (train.py's, minus DDP/resume). Returns a summary dict."""
    model.to(device).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.99), device.split(":")[0])
    step_fn = torch.compile(model) if cfg.compile else model
    is_moe = isinstance(model, MoEGPT)
    layers = model.moe_layers() if is_moe else []
    window_load = {i: torch.zeros(cfg.n_experts) for i, _ in layers}  # load since the last eval
    dropped_sum, n_steps = 0.0, 0
    gen = torch.Generator().manual_seed(cfg.seed)  # same training batches for both models
    tokens_per_step = cfg.batch_size * cfg.block_size
    timed_tokens, timed_s, t_start = 0, 0.0, time.time()
    val_losses = {}
    for step in range(cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val_losses[step] = estimate_val_loss(model, bins["val"], cfg, device, dtype)
            print(f"{label} step {step}: val loss {val_losses[step]:.4f}")
            metrics.log({"model": label, "step": step, "val_loss": val_losses[step]})
            if step == cfg.max_iters:
                break
            if step:
                window_load = {i: torch.zeros(cfg.n_experts) for i, _ in layers}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        t0 = time.time()
        x, y = bins["train"].get_batch(cfg.batch_size, cfg.block_size, gen, device)
        with common.autocast(device, dtype):
            _, lm_loss = step_fn(x, y)
            aux = model.aux_loss() if is_moe else torch.zeros((), device=device)
        (lm_loss + aux).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_moe:
            model.update_expert_biases()
            for i, m in layers:
                window_load[i] += m.last_load.cpu()
            step_dropped = sum(m.last_dropped.item() for _, m in layers) / len(layers)
            dropped_sum += step_dropped
        lm = lm_loss.item()  # syncs the device, so the timing below is honest
        dt = time.time() - t0
        n_steps += 1
        if step >= 2:  # the first steps pay for allocation / compilation
            timed_tokens, timed_s = timed_tokens + tokens_per_step, timed_s + dt
        if step % cfg.log_interval == 0:
            tps = tokens_per_step / dt
            eta = (time.time() - t_start) / (step + 1) * (cfg.max_iters - step - 1)
            extra = f" aux {aux.item():.4f} dropped {100 * step_dropped:.1f}%" if is_moe else ""
            print(f"{label} step {step}/{cfg.max_iters}: loss {lm:.4f}{extra} lr {lr_at(step, cfg):.2e} "
                  f"{tps:,.0f} tok/s ETA {eta:.0f}s")
            metrics.log({"model": label, "step": step, "loss": lm, "aux_loss": aux.item(), "tokens_per_s": tps})
    summary = {"val_loss": val_losses[cfg.max_iters], "val_losses": val_losses,
               "tokens_per_s": timed_tokens / timed_s if timed_s else float("nan"),
               "params": model.num_params(),
               "active_params": model.num_active_params() if is_moe else model.num_params()}
    if is_moe:
        cv = [(w.std(unbiased=False) / w.mean()).item() for w in window_load.values()]
        summary.update(load={i: w.tolist() for i, w in window_load.items()}, load_cv=sum(cv) / len(cv),
                       max_over_mean=max((w.max() / w.mean()).item() for w in window_load.values()),
                       dropped_fraction=dropped_sum / max(1, n_steps))
    return summary


@cli
def main(argv=None):
    cfg = common.parse_config(TrainConfig, argv, __doc__)
    moe_cfg = MoEConfig(**{f.name: getattr(cfg, f.name) for f in fields(MoEConfig)})
    common.check_options(cfg, positive=("moe_every", "max_iters", "eval_interval", "eval_iters", "log_interval",
                                        "batch_size", "learning_rate", "block_size"),
                         non_negative=("min_lr", "warmup_iters", "weight_decay", "grad_clip"))
    out_dir = Path(cfg.out_dir)
    common.check_out_dir(out_dir)
    # the model config is checked before the data is touched; the vocabulary comes from the data
    config = gpt.GPTConfig(block_size=cfg.block_size, vocab_size=1, n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    if cfg.moe_every > cfg.n_layer:
        raise NanoError(f"moe_every {cfg.moe_every} > n_layer {cfg.n_layer} leaves no MoE layer")
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(device, cfg.dtype)
    data_dir = data.prepare_dataset(cfg.dataset, input=cfg.input, data_root=cfg.data_root)
    meta = data.read_meta(data_dir)
    bins = {split: data.TokenBins(data_dir, split) for split in ("train", "val")}
    config = replace(config, vocab_size=meta["vocab_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with common.MetricsLog(out_dir / "metrics.jsonl", tracker=cfg.tracker, config=asdict(cfg)) as metrics:
        common.set_seed(cfg.seed)
        moe_model = MoEGPT(config, moe_cfg, cfg.moe_every)
        print(f"MoE GPT: {moe_model.num_params() / 1e6:.2f}M params, {moe_model.num_active_params() / 1e6:.2f}M "
              f"active per token ({len(moe_model.moe_layers())} MoE layers, E={cfg.n_experts}, k={cfg.top_k}, "
              f"{'dropless' if cfg.dropless else f'capacity factor {cfg.capacity_factor}'}, balance={cfg.balance})")
        results["moe"] = train(moe_model, "moe", cfg, bins, device, dtype, metrics)
        save_moe_checkpoint(out_dir / "ckpt.pt", moe_model, meta["tokenizer"], step=cfg.max_iters)
        print(f"saved the MoE checkpoint to {out_dir / 'ckpt.pt'} (load it with moe.load_moe_checkpoint)")
        if cfg.compare_dense:
            common.set_seed(cfg.seed)
            dense = gpt.GPT(config)
            print(f"dense GPT: {dense.num_params() / 1e6:.2f}M params")
            results["dense"] = train(dense, "dense", cfg, bins, device, dtype, metrics)

    m = results["moe"]
    print(f"\nexpert load over the last {cfg.max_iters % cfg.eval_interval or cfg.eval_interval} steps "
          f"(share of the top-{cfg.top_k} slots):")
    for i, load in m["load"].items():
        print(f"  layer {i}:\n{load_bars(torch.tensor(load))}")
    print(f"load imbalance: coefficient of variation {m['load_cv']:.3f}, max/mean {m['max_over_mean']:.2f}; "
          f"dropped-token fraction {100 * m['dropped_fraction']:.2f}%")
    print(f"\n{'model':<7}{'params':>10}{'active':>10}{'val loss':>10}{'tok/s':>10}   (after {cfg.max_iters} steps)")
    for label, r in results.items():
        print(f"{label:<7}{r['params'] / 1e6:>9.2f}M{r['active_params'] / 1e6:>9.2f}M{r['val_loss']:>10.4f}"
              f"{r['tokens_per_s']:>10,.0f}")
    print(f"plot: python plot.py {out_dir / 'metrics.jsonl'}")
    return results


if __name__ == "__main__":
    main()
