"""A paged KV cache with prefix caching: fixed-size blocks handed out on demand, shared by hash.

The idea: PagedAttention (Kwon et al. 2023, arXiv:2309.06180, vLLM). A static cache gives every
request a row of max_len slots, so memory is max_batch x max_len whatever the requests hold.
Here the keys and values of every layer live in ONE preallocated pool of slots, cut into blocks
of block_size slots; a request owns a block table (the ids of its blocks, in order), token p of
the request sits in slot table[p // block_size] * block_size + p % block_size, and a block is
taken only when the request's tokens reach it and given back when it ends. Memory then follows
the tokens in flight. Attention reads a request's keys through its table (a gather: cheap in
PyTorch on a CPU; a GPU kernel would read the blocks in place).

Prefix caching (vLLM's automatic prefix caching; SGLang's radix cache does it with a tree): a
FULL block's keys depend only on its tokens and every token before it, so it is named by a
chained hash, hash(previous block's hash, its tokens). A new request walks its prompt block by
block and reuses every block whose hash is known: those tokens skip prefill. Blocks are
ref-counted (several requests may read one); a block whose count drops to 0 keeps its keys and
its hash and joins the free list at the tail, so it can still be hit until it is reused, and
the head of the list is the least recently freed: eviction is LRU. At least the prompt's last
token is always recomputed, even when the whole prompt is cached (its logits are needed to
sample the first new token).

Run: imported by serve.py and scheduler.py; python -m pytest tests/test_kv_blocks.py
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from common import NanoError


class BlockManager:
    """Which block holds what: ref counts, the free list (LRU order) and the prefix-hash table.
    Knows nothing of tensors; a request is seen as (its token ids, its block table)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise NanoError(f"need at least one block of at least one slot (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks  # a full block's chained hash
        self.tokens_of: list[tuple | None] = [None] * num_blocks  # its tokens: a hash hit is checked against them
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: evicted first
        self.queried_tokens = self.hit_tokens = 0  # prefix-cache hit rate = hit / queried

    @staticmethod
    def chain(parent: int | None, tokens) -> int:
        return hash((parent, tuple(tokens)))

    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def match_prefix(self, tokens) -> list[int]:
        """The cached blocks that hold a prefix of tokens (whole blocks, and never the last token:
        a fully cached prompt still recomputes its last block's last token). Takes no reference."""
        found, parent, bs = [], None, self.block_size
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // bs):
                piece = tuple(tokens[i * bs:(i + 1) * bs])
                parent = self.chain(parent, piece)
                block = self.cached.get(parent)
                if block is None or self.tokens_of[block] != piece:
                    break
                found.append(block)
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(found) * bs
        return found

    def acquire(self, blocks):
        """Take a reference on cached blocks (a prefix hit): a free one leaves the free list."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently freed cached ones), or None if fewer are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.hash_of[b] is not None:  # evict: its keys are about to be overwritten
                if self.cached.get(self.hash_of[b]) == b:
                    del self.cached[self.hash_of[b]]
                self.hash_of[b] = self.tokens_of[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, table):
        """Drop a request's references; blocks nobody holds go to the free list's tail, the
        request's last block first, so a prefix's first blocks are the last to be evicted."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def commit(self, tokens, table, n_before: int, n_after: int):
        """Name the blocks that filled up as tokens n_before..n_after-1 were computed, so later
        requests can hit them (the chained hash continues from the block before)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(n_before // bs, n_after // bs):
            parent = self.hash_of[table[i - 1]] if i > 0 else None
            piece = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.chain(parent, piece)
            if self.hash_of[table[i]] is None and h not in self.cached:
                self.hash_of[table[i]], self.tokens_of[table[i]] = h, piece
                self.cached[h] = table[i]
            elif self.hash_of[table[i]] is None:  # the same prefix computed twice: keep one copy named
                self.hash_of[table[i]] = h  # (so a later block can chain from it), unlisted
                self.tokens_of[table[i]] = piece


# ----------------------------------------------------------------------------------------
# The pool of slots and one step's view of it


class PagedKV:
    """Every layer's keys and values: (num_blocks * block_size, n_kv_head, head_dim) each, zeros
    (a masked slot must still hold finite numbers). Slot s belongs to block s // block_size."""

    def __init__(self, model, num_blocks: int, block_size: int, dtype=None):
        cfg, weight = model.config, model.transformer.wte.weight
        shape = (num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)
        dtype = dtype or weight.dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in range(cfg.n_layer)]
        self.block_size = block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def batch(self, segments, rows, window=0):
        """One forward pass's layout. segments: (token ids, first position, block table) per
        request, the tokens to compute this step; rows: lists of segment indices, one list per
        batch row, every row the same number of tokens (decode: a row per request, one token
        each; prefill chunks: one row holding every segment one after the other). Returns idx
        and positions (R, T), the write slots (R*T,), and one layer view per layer, each reading
        keys through a gather index (R, S) under a mask (R, 1, T, S): a query sees the keys of
        its own request at positions up to its own (and, with a sliding window, fewer than window
        back), padding sees nothing but slot 0."""
        bs, idx, pos, write, gather, key_seg, key_pos, q_seg = self.block_size, [], [], [], [], [], [], []
        for row in rows:
            idx.append([t for s in row for t in segments[s][0]])
            pos.append([p for s in row for p in range(segments[s][1], segments[s][1] + len(segments[s][0]))])
            q_seg.append([s for s in row for _ in segments[s][0]])
            slots, seg_of, pos_of = [], [], []
            for s in row:
                tokens, start, table = segments[s]
                n = start + len(tokens)  # keys this request has after the step
                mine = [b * bs + o for b in table[:self.blocks(n)] for o in range(bs)][:n]
                write += mine[start:]  # this step's tokens: their keys go here
                slots += mine
                seg_of += [s] * n
                pos_of += range(n)
            gather.append(slots), key_seg.append(seg_of), key_pos.append(pos_of)
        width = max(map(len, gather))
        pad = [width - len(g) for g in gather]
        gather = torch.tensor([g + [0] * n for g, n in zip(gather, pad)])
        key_seg = torch.tensor([g + [-1] * n for g, n in zip(key_seg, pad)])
        key_pos = torch.tensor([g + [0] * n for g, n in zip(key_pos, pad)])
        pos_t, q_seg = torch.tensor(pos), torch.tensor(q_seg)
        mask = (key_seg[:, None, :] == q_seg[:, :, None]) & (key_pos[:, None, :] <= pos_t[:, :, None])
        if window:  # Mistral's band: keys window or more positions back are masked too
            mask &= key_pos[:, None, :] > pos_t[:, :, None] - window
        device = self.k[0].device
        write, gather, mask = torch.tensor(write, device=device), gather.to(device), mask[:, None].to(device)
        views = [LayerView(k, v, write, gather) for k, v in zip(self.k, self.v)]
        return torch.tensor(idx, device=device), pos_t.to(device), mask, views

    def blocks(self, n_tokens):
        return -(-n_tokens // self.block_size)


class LayerView:
    """What gpt.py's attention calls as its kv_cache: update() writes this step's keys and values
    (R, n_kv_head, T, head_dim) into their slots, then returns every key/value the step's
    queries may see, gathered through the block tables: (R, n_kv_head, S, head_dim)."""

    def __init__(self, k, v, write, gather):
        self.k, self.v, self.write, self.gather = k, v, write, gather

    def update(self, input_pos, k, v):
        R, H, T, D = k.shape
        self.k.index_copy_(0, self.write, k.transpose(1, 2).reshape(R * T, H, D))
        self.v.index_copy_(0, self.write, v.transpose(1, 2).reshape(R * T, H, D))
        flat = self.gather.reshape(-1)
        S = self.gather.shape[1]
        keys = self.k.index_select(0, flat).view(R, S, H, D).transpose(1, 2)
        values = self.v.index_select(0, flat).view(R, S, H, D).transpose(1, 2)
        return keys, values
