"""The scheduler of a paged serving engine: which requests compute how many tokens this step.

The idea (vLLM v1's scheduler; nano-vllm's, Orca's iteration-level scheduling): there is no
"prefill phase" and "decode phase", only requests whose tokens are not all computed yet. A
request knows its tokens (prompt + generated so far) and how many of them have keys in the
cache (num_computed); each step gives every scheduled request some of the rest, under two
budgets: at most max_num_seqs requests, at most max_num_batched_tokens tokens in one forward.
- Running requests go first, oldest first: a decoding one needs 1 token; one whose prompt is
  being prefilled in chunks takes what is left of the budget. A long prompt is thus split
  over several steps and the decoding requests keep their one token per step beside it
  (chunked prefill: one 4k-token prompt no longer stalls every stream for its whole prefill).
- Then waiting requests, first come first served, while the budgets last: the prefix cache is
  asked first (kv_blocks.BlockManager.match_prefix), so a cached prefix costs no compute.
- A request that needs a new block when none is free takes one from the newest running request:
  that one is preempted (its blocks freed, back to the head of the waiting queue, to be
  recomputed later: prompt + what it generated; its full blocks may well still be in the
  prefix cache then). Recompute is vLLM's default on GPUs; the other choice swaps the blocks out.
A request's tokens after one step: num_computed += scheduled; if that reaches its length, the
step sampled its next token (postprocess appends it), else it is still prefilling.

Run: imported by serve.py; python -m pytest tests/test_scheduler.py
"""

from __future__ import annotations

from collections import deque

from common import NanoError
from kv_blocks import BlockManager


class Scheduler:
    """Requests are any objects with .tokens (list of ids), .num_computed and .table (block ids)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise NanoError(f"max_num_seqs and max_num_batched_tokens must be >= 1 "
                            f"(got {max_num_seqs}, {max_num_batched_tokens})")
        self.blocks, self.max_num_seqs, self.max_num_batched_tokens = blocks, max_num_seqs, max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.preemptions = 0
        self.prefix_queried = self.prefix_hit = 0  # prompt tokens looked up / found in the prefix cache

    def add(self, req):
        req.num_computed, req.table = 0, []
        self.waiting.append(req)

    def schedule(self) -> list[tuple[object, int]]:
        """-> [(request, tokens to compute this step)], running requests first."""
        budget, out, preempted = self.max_num_batched_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(len(req.tokens) - req.num_computed, budget)
            while not self.grow(req, req.num_computed + n):  # out of blocks: the newest running one yields
                preempted = True
                victim = self.running.pop()
                self.preempt(victim)
                if victim is req:
                    break
            else:
                out.append((req, n))
                budget -= n
                i += 1
                continue
            break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            hit = self.blocks.match_prefix(req.tokens)
            self.blocks.acquire(hit)
            req.table, req.num_computed = list(hit), len(hit) * self.blocks.block_size
            n = min(len(req.tokens) - req.num_computed, budget)
            if not self.grow(req, req.num_computed + n):  # no room yet: it waits at the head
                self.blocks.release(req.table)
                req.table, req.num_computed = [], 0
                break
            self.prefix_queried += len(req.tokens)
            self.prefix_hit += len(hit) * self.blocks.block_size
            self.running.append(self.waiting.popleft())
            out.append((req, n))
            budget -= n
        return out

    def grow(self, req, n_tokens) -> bool:
        """Give req the blocks n_tokens need; False (and nothing taken) if too few are free."""
        new = self.blocks.allocate(max(0, self.blocks.blocks_for(n_tokens) - len(req.table)))
        if new is None:
            return False
        req.table += new
        return True

    def preempt(self, req):
        """Preemption by recompute: free its blocks, requeue it first; its tokens stay."""
        self.blocks.release(req.table)
        req.table, req.num_computed = [], 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    def computed(self, req, n) -> bool:
        """After the step: n more tokens of req have keys in the cache (full blocks get named in the
        prefix cache). True if all its tokens are computed: the step sampled its next token."""
        before = req.num_computed
        req.num_computed += n
        self.blocks.commit(req.tokens, req.table, before, req.num_computed)
        return req.num_computed == len(req.tokens)

    def finish(self, req):
        """Out of the scheduler, wherever it is (running, waiting, or already gone); its blocks freed."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return
        self.blocks.release(req.table)
        req.table = []

    def prefix_hit_rate(self) -> float:
        return self.prefix_hit / self.prefix_queried if self.prefix_queried else 0.0

    def gauges(self) -> dict:
        """What GET /metrics reports of the scheduler and the KV cache (vLLM's names)."""
        used, total = self.blocks.num_blocks - self.blocks.num_free(), self.blocks.num_blocks
        return {"num_requests_running": len(self.running), "num_requests_waiting": len(self.waiting),
                "kv_blocks_used": used, "kv_blocks_total": total, "kv_cache_usage_perc": used / total,
                "prefix_cache_hit_rate": self.prefix_hit_rate(), "num_preemptions": self.preemptions}
