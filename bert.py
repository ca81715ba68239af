"""BERT: a bidirectional Transformer encoder pretrained by filling in masked words.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (arXiv:1810.04805). Where GPT predicts the next token and may only look left,
BERT sees the whole sentence at once: no causal mask, so it cannot generate left to right; it is
trained instead to recover tokens hidden in the input (the masked LM, a "cloze" task).

    [CLS] to be or [MASK] to be [SEP]  --embed: token + learned position + segment-->
    N x post-LN blocks: x = LN(x + Attn(x)); x = LN(x + FFN_gelu(x))  (no causal mask)
    --MLM head: LN(gelu(dense(h))) @ tok_emb^T + bias--> logits at each position

Masking (section 3.1, exactly as transformers' DataCollatorForLanguageModeling draws it, one
Bernoulli draw per position each time): 15% of the non-special positions are selected and must
be predicted; of those, 80% become [MASK], 10% a random token, 10% stay unchanged, so the model
cannot rely on seeing [MASK] and must keep a representation of every token. The optional NSP
head (next sentence prediction: is segment B the text that followed A?) sits on the [CLS]
state through a tanh pooler. Differences from GPT (gpt.py): post-LN instead of pre-LN, learned
segment (token type) embeddings, exact-erf GELU, LayerNorm eps 1e-12, the MLM head's extra
dense + LN, and the loss only at the 15%.

The unigram plateau: a fresh BERT first predicts the most frequent tokens everywhere (and copies
the 10% kept), and at a [MASK] its output does not depend on the context at all: every word it
could use arrives through attention, which starts uniform, so a neighbour's signal is diluted by
the window length, and learned positions must first organise for "look one to the left" to exist.
The escape is sudden (the loss drops ~0.5 within a few hundred steps) and late: on windows of 64
tokens it had not come after 2500 steps here (transformers' BertForMaskedLM on the same batches:
no different; tests: our gradients equal its); on windows of 12 it comes after ~1000-1300.
So the CPU default trains short windows, as BERT itself trained 90% of its steps at 128 tokens.

Tokenizer: WordPiece (wordpiece.py), trained on the text first. Weights load from a Hugging Face
folder with BertForMaskedLM / BertForPreTraining names (load_hf), equal logits.

Run: python bert.py        (Tiny Shakespeare on a CPU: trains a 1000-piece WordPiece vocab, then a
                            2-layer, 128-wide BERT, 3000 steps of 160 windows of 12 tokens (5-7 min
                            on one thread of a busy shared CPU); prints held-out masked-token accuracy at the
                            [MASK]ed positions and at all selected ones vs the unigram baseline;
                            --n_layer 12 --n_head 12 --n_embd 768 are BERT-base's shapes)
     python bert.py --fill "To be or [MASK] to be"      (top predictions from out-bert/ckpt.pt)
     python bert.py --nsp True                           (also the next-sentence head)
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import common
import hf_io
import wordpiece
from common import NanoError, cli

IGNORE = -100  # label of positions not selected for prediction (transformers' convention)


@dataclass
class BertConfig:
    vocab_size: int = 30522  # defaults: BERT-base (BertConfig.base())
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_id: int = 0
    nsp: bool = False  # the pooler + next-sentence head (BertForPreTraining)

    @classmethod
    def base(cls, **overrides):
        """BERT-base: 12 layers, 12 heads, 768 wide, 110M parameters with its 30522 WordPieces."""
        return cls(**overrides)

    @classmethod
    def from_hf(cls, hf: dict, nsp: bool = False):
        act, pos = hf.get("hidden_act", "gelu"), hf.get("position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise NanoError(f"hidden_act {act!r} / position_embedding_type {pos!r}: only gelu / absolute "
                            "are written here (use a BERT-style checkpoint)")
        return cls(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   n_embd=hf["hidden_size"], n_inner=hf["intermediate_size"],
                   max_position=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
                   pad_id=hf.get("pad_token_id") or 0, nsp=nsp)


class Block(nn.Module):
    """One encoder layer, post-LN as the paper and HF: the residual sum is normalized."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.n_head = cfg.n_embd, cfg.n_head
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_ln = nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.up, self.down = nn.Linear(d, cfg.n_inner), nn.Linear(cfg.n_inner, d)
        self.ffn_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pad_bias):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        att = q @ k.transpose(-2, -1) / math.sqrt(C // self.n_head) + pad_bias  # every token sees every token
        y = self.drop(att.softmax(dim=-1)) @ v
        x = self.attn_ln(x + self.drop(self.attn_out(y.transpose(1, 2).reshape(B, T, C))))
        return self.ffn_ln(x + self.drop(self.down(F.gelu(self.up(x)))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg, d = cfg, cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_position, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_ln, self.drop = nn.LayerNorm(d, eps=cfg.layer_norm_eps), nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.mlm_dense, self.mlm_ln = nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder is tok_emb, tied
        if cfg.nsp:
            self.pooler, self.nsp_head = nn.Linear(d, d), nn.Linear(d, 2)
        self.apply(self.init_weights)

    def init_weights(self, m):
        """HF's BertPreTrainedModel init: N(0, 0.02) weights, zero biases, the [PAD] row zero."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def encode(self, idx, token_type=None, attention_mask=None):
        """Hidden states (B, T, n_embd). attention_mask: 1 = token, 0 = padding (never attended to)."""
        B, T = idx.shape
        if T > self.cfg.max_position:
            raise NanoError(f"{T} tokens exceed max_position {self.cfg.max_position} (shorten the text)")
        token_type = torch.zeros_like(idx) if token_type is None else token_type
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)) + self.type_emb(token_type)
        x = self.drop(self.emb_ln(x))
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask
        pad_bias = ((1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min)
        for block in self.layers:
            x = block(x, pad_bias)
        return x

    def forward(self, idx, token_type=None, attention_mask=None, labels=None, nsp_labels=None):
        """(mlm_logits, nsp_logits or None, loss or None). With labels, logits only at the
        positions to predict (labels != -100): the loss needs no others, and it is ~7x less work."""
        h = self.encode(idx, token_type, attention_mask)
        nsp_logits = self.nsp_head(torch.tanh(self.pooler(h[:, 0]))) if self.cfg.nsp else None
        if labels is not None:
            h, labels = h[labels != IGNORE], labels[labels != IGNORE]
        logits = self.mlm_ln(F.gelu(self.mlm_dense(h))) @ self.tok_emb.weight.T + self.mlm_bias
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels) if labels.numel() else logits.sum() * 0
            if nsp_logits is not None and nsp_labels is not None:
                loss = loss + F.cross_entropy(nsp_logits.float(), nsp_labels)
        return logits, nsp_logits, loss


# ---------------------------------------------------------------------------------------------
# The masked-LM objective

def mask_tokens(ids, special_mask, vocab_size: int, mask_id: int, mlm_probability: float = 0.15,
                generator: torch.Generator | None = None, mask_replace_prob: float = 0.8,
                random_replace_prob: float = 0.1):
    """(inputs, labels) as DataCollatorForLanguageModeling.torch_mask_tokens draws them, draw for
    draw (same generator, same masks): each non-special position is selected with probability
    mlm_probability (labels elsewhere -100); a selected one becomes [MASK] with probability 0.8,
    else a uniformly random id with probability 0.1 / 0.2, else stays."""
    inputs, labels = ids.clone(), ids.clone()
    prob = torch.full(labels.shape, mlm_probability).masked_fill_(special_mask, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = IGNORE
    replaced = torch.bernoulli(torch.full(labels.shape, mask_replace_prob), generator=generator).bool() & selected
    inputs[replaced] = mask_id
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return inputs, labels
    scaled = random_replace_prob / (1 - mask_replace_prob)
    randomized = torch.bernoulli(torch.full(labels.shape, scaled), generator=generator).bool() & selected & ~replaced
    words = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)
    inputs[randomized] = words[randomized]
    return inputs, labels


def make_batch(data, batch_size: int, block_size: int, tok: wordpiece.WordPiece, nsp: bool,
               generator: torch.Generator, starts=None):
    """(idx, token_type, nsp_labels) of windows of data: [CLS] w [SEP]; with nsp,
    [CLS] A [SEP] B [SEP] where B follows A (label 0) or, half the time, is a random window (1)."""
    cls_, sep = tok.vocab["[CLS]"], tok.vocab["[SEP]"]
    n = block_size - (3 if nsp else 2)
    if starts is None:
        starts = torch.randint(len(data) - 2 * n, (batch_size,), generator=generator)
    if not nsp:
        idx = torch.stack([torch.cat([data.new_tensor([cls_]), data[s:s + n], data.new_tensor([sep])]) for s in starts])
        return idx, torch.zeros_like(idx), None
    len_a = n // 2
    labels = torch.randint(2, (len(starts),), generator=generator)
    others = torch.randint(len(data) - 2 * n, (len(starts),), generator=generator)
    rows, types = [], []
    for s, label, other in zip(starts.tolist(), labels.tolist(), others.tolist()):
        b = s + len_a if label == 0 else other
        rows.append(torch.cat([data.new_tensor([cls_]), data[s:s + len_a], data.new_tensor([sep]),
                               data[b:b + n - len_a], data.new_tensor([sep])]))
        types.append(torch.tensor([0] * (len_a + 2) + [1] * (n - len_a + 1)))
    return torch.stack(rows), torch.stack(types), labels


def special_mask(idx, tok: wordpiece.WordPiece):
    """Positions holding a special token ([CLS], [SEP], [PAD], [UNK], [MASK]): never selected,
    as transformers' get_special_tokens_mask."""
    specials = torch.tensor([tok.vocab[s] for s in wordpiece.SPECIALS if s in tok.vocab])
    return torch.isin(idx, specials)


# ---------------------------------------------------------------------------------------------
# Hugging Face weights: BertForMaskedLM / BertForPreTraining names

HF_NAMES = {"tok_emb": "bert.embeddings.word_embeddings", "pos_emb": "bert.embeddings.position_embeddings",
            "type_emb": "bert.embeddings.token_type_embeddings", "emb_ln": "bert.embeddings.LayerNorm",
            "mlm_dense": "cls.predictions.transform.dense", "mlm_ln": "cls.predictions.transform.LayerNorm",
            "pooler": "bert.pooler.dense", "nsp_head": "cls.seq_relationship",
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_ln": "attention.output.LayerNorm",
            "up": "intermediate.dense", "down": "output.dense", "ffn_ln": "output.LayerNorm"}


def to_hf_name(name: str) -> str:
    if name == "mlm_bias":
        return "cls.predictions.bias"
    parts = name.split(".")
    if parts[0] == "layers":
        return f"bert.encoder.layer.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


def load_hf(name_or_dir: str) -> Bert:
    """A Bert holding the weights of a Hugging Face BERT folder (config.json + safetensors)."""
    folder, hf, files, _ = hf_io.hf_folder(name_or_dir)
    tensors = {}
    for f in files:
        tensors.update(hf_io.read_safetensors(folder / f))
    if not hf.get("tie_word_embeddings", True):
        raise NanoError(f"{folder}: tie_word_embeddings is false; the MLM decoder here is the embedding matrix "
                        "(use a folder with tied weights, as BERT's)")
    model = Bert(BertConfig.from_hf(hf, nsp="cls.seq_relationship.weight" in tensors))
    with torch.no_grad():
        for name, param in model.state_dict().items():
            key = to_hf_name(name)
            if key not in tensors:
                raise NanoError(f"{folder} lacks {key} (a BertForMaskedLM / BertForPreTraining folder has it)")
            if tensors[key].shape != param.shape:
                raise NanoError(f"{key} is {tuple(tensors[key].shape)} in {folder}, config.json says "
                                f"{tuple(param.shape)} (the folder is inconsistent)")
            param.copy_(tensors[key])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Training on a text file, evaluation, --fill

@dataclass
class BertTrainConfig:
    input: str = "assets/tinyshakespeare.txt"
    out_dir: str = "out-bert"
    fill: str = ""  # a text with [MASK]s: print the top predictions of out_dir's model, train nothing
    top_k: int = 5
    vocab_size: int = 1000  # of the WordPiece vocabulary trained on the text first
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 12  # tokens per window, [CLS]/[SEP] included: short windows leave the plateau sooner
    nsp: bool = False
    batch_size: int = 160
    max_iters: int = 3000
    lr: float = 2e-3
    warmup_iters: int = 50
    weight_decay: float = 0.01
    dropout: float = 0.0  # BERT's 0.1 slows these short runs down
    mlm_probability: float = 0.15
    val_fraction: float = 0.1
    eval_windows: int = 4096  # held-out windows evaluated (at most all of them)
    seed: int = 1337
    device: str = "auto"


@torch.no_grad()
def evaluate(model: Bert, data, tok, cfg: BertTrainConfig, baseline_id: int) -> dict:
    """Masked-token accuracy (argmax == the original token, at the 15% selected, masked 80/10/10
    with a fixed seed) on consecutive windows of data, and the unigram baseline's: always the
    most frequent token of the training text. mask_acc: at the positions shown as [MASK] only
    (at the 10% kept the answer is in the input, so acc rewards copying too)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    n = cfg.block_size - (3 if cfg.nsp else 2)
    starts = torch.arange(0, len(data) - 2 * n, n)[:cfg.eval_windows]
    hits = base = total = loss = mask_hits = mask_base = masked = 0.0
    for chunk in starts.split(cfg.batch_size):
        idx, types, _ = make_batch(data, 0, cfg.block_size, tok, cfg.nsp, g, starts=chunk)
        inputs, labels = mask_tokens(idx, special_mask(idx, tok), len(tok), tok.vocab["[MASK]"], cfg.mlm_probability, g)
        dev = model.tok_emb.weight.device
        logits, _, batch_loss = model(inputs.to(dev), types.to(dev), labels=labels.to(dev))
        target = labels[labels != IGNORE].to(dev)
        right = logits.argmax(-1) == target
        shown_mask = (inputs[labels != IGNORE] == tok.vocab["[MASK]"]).to(dev)  # the 80%: no copying possible
        hits += right.sum().item()
        base += (target == baseline_id).sum().item()
        mask_hits += right[shown_mask].sum().item()
        mask_base += (target[shown_mask] == baseline_id).sum().item()
        masked += shown_mask.sum().item()
        total += target.numel()
        loss += batch_loss.item() * target.numel()
    model.train()
    masked = max(masked, 1)  # (a tiny eval may draw no [MASK])
    return {"acc": hits / total, "baseline_acc": base / total, "loss": loss / total, "predicted": int(total),
            "mask_acc": mask_hits / masked, "mask_baseline_acc": mask_base / masked, "masked": int(masked)}


def train(cfg: BertTrainConfig) -> dict:
    common.set_seed(cfg.seed)
    device = common.pick_device(cfg.device)
    text = Path(cfg.input).read_text(encoding="utf-8")
    cut = int(len(text) * (1 - cfg.val_fraction))
    t0 = time.time()
    tok = wordpiece.train_wordpiece(text[:cut], cfg.vocab_size)
    train_ids, val_ids = torch.tensor(tok.encode(text[:cut])), torch.tensor(tok.encode(text[cut:]))
    print(f"WordPiece: {len(tok)} pieces, {len(train_ids):,} train / {len(val_ids):,} val tokens ({time.time() - t0:.0f} s)")
    if len(val_ids) < 2 * cfg.block_size:
        raise NanoError(f"{len(val_ids)} held-out tokens are fewer than two blocks (a longer --input, or a smaller --block_size)")
    counts = torch.bincount(train_ids, minlength=len(tok))
    counts[special_mask(torch.arange(len(tok)), tok)] = 0
    baseline_id = int(counts.argmax())
    model = Bert(BertConfig(vocab_size=len(tok), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                            n_inner=4 * cfg.n_embd, max_position=cfg.block_size, dropout=cfg.dropout,
                            pad_id=tok.vocab["[PAD]"], nsp=cfg.nsp)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(cfg.seed)
    before = evaluate(model, val_ids, tok, cfg, baseline_id)
    t0 = time.time()
    for it in range(cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(it, cfg.lr, cfg.lr / 10, cfg.warmup_iters, cfg.max_iters)
        idx, types, nsp_labels = make_batch(train_ids, cfg.batch_size, cfg.block_size, tok, cfg.nsp, g)
        inputs, labels = mask_tokens(idx, special_mask(idx, tok), len(tok), tok.vocab["[MASK]"], cfg.mlm_probability, g)
        _, _, loss = model(inputs.to(device), types.to(device), labels=labels.to(device),
                           nsp_labels=None if nsp_labels is None else nsp_labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % 100 == 0 or it == cfg.max_iters - 1:
            print(f"iter {it}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    after = evaluate(model, val_ids, tok, cfg, baseline_id)
    result = {"before": before, "after": after, "train_s": time.time() - t0, "baseline_token": tok.pieces[baseline_id]}
    name = repr(tok.pieces[baseline_id])
    print(f"held-out accuracy at the [MASK]ed positions: {after['mask_acc']:.1%} vs {after['mask_baseline_acc']:.1%} "
          f"for the unigram baseline (always {name}), {after['masked']} predictions")
    print(f"held-out accuracy at all selected positions (+ random, kept): {after['acc']:.1%} vs "
          f"{after['baseline_acc']:.1%} (untrained {before['acc']:.1%}), {after['predicted']} predictions; "
          f"MLM loss {after['loss']:.3f}; {result['train_s']:.0f} s")
    common.atomic_save({"config": asdict(model.cfg), "model": model.state_dict(), "vocab": list(tok.vocab),
                        "metrics": {k: v for k, v in after.items()}}, Path(cfg.out_dir) / "ckpt.pt")
    print(f"saved {Path(cfg.out_dir) / 'ckpt.pt'}; next: python bert.py --out_dir {cfg.out_dir} "
          f"--fill \"To be or [MASK] to be\"")
    return result


def load_checkpoint(out_dir) -> tuple[Bert, wordpiece.WordPiece]:
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise NanoError(f"no {path} (train one first: python bert.py --out_dir {out_dir})")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = Bert(BertConfig(**{f.name: ck["config"][f.name] for f in fields(BertConfig)}))
    model.load_state_dict(ck["model"])
    return model.eval(), wordpiece.WordPiece(ck["vocab"])


def encode_with_specials(tok: wordpiece.WordPiece, text: str) -> list[int]:
    """[CLS] text [SEP], the special tokens written in the text ([MASK], [SEP]) kept whole."""
    parts = re.split("(" + "|".join(re.escape(s) for s in wordpiece.SPECIALS) + ")", text)
    ids = [i for p in parts for i in ([tok.vocab[p]] if p in tok.vocab and p in wordpiece.SPECIALS else tok.encode(p))]
    return [tok.vocab["[CLS]"]] + ids + [tok.vocab["[SEP]"]]


@torch.no_grad()
def fill(model: Bert, tok: wordpiece.WordPiece, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] of text, the top_k (piece, probability). A text longer than the model's
    positions is read, as in training, in a window of that many tokens around each [MASK]."""
    ids, mask_id = encode_with_specials(tok, text)[1:-1], tok.vocab["[MASK]"]
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise NanoError(f"no [MASK] in {text!r} (write [MASK] where a word should be predicted)")
    n, rows = model.cfg.max_position - 2, []
    for w in where:
        start = max(0, min(w - n // 2, len(ids) - n))
        window = torch.tensor([[tok.vocab["[CLS]"]] + ids[start:start + n] + [tok.vocab["[SEP]"]]])
        top = model(window)[0][0, 1 + w - start].softmax(-1).topk(top_k)
        rows.append([(tok.pieces[i], p) for i, p in zip(top.indices.tolist(), top.values.tolist())])
    return rows


@cli
def main(argv=None):
    cfg = common.parse_config(BertTrainConfig, argv, __doc__)
    common.check_options(cfg, positive=("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                        "max_iters", "lr", "top_k", "eval_windows"),
                         ranges={"mlm_probability": (0, 1), "val_fraction": (0, 1), "dropout": (0, 1)})
    if cfg.fill:
        model, tok = load_checkpoint(cfg.out_dir)
        for n, row in enumerate(fill(model, tok, cfg.fill, cfg.top_k)):
            print(f"[MASK] {n + 1}: " + "  ".join(f"{piece} {p:.3f}" for piece, p in row))
        return None
    if cfg.n_embd % cfg.n_head:
        raise NanoError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head} (change one)")
    common.check_out_dir(cfg.out_dir)
    if not Path(cfg.input).is_file():
        raise NanoError(f"no file {cfg.input} (give --input a text file)")
    return train(cfg)


if __name__ == "__main__":
    main()
