"""scheduler.py: budgets, chunked prefill beside decoding requests, preemption by recompute."""

from types import SimpleNamespace

import pytest

import kv_blocks
import scheduler
from common import NanoError


def req(n_prompt):
    return SimpleNamespace(tokens=list(range(1, n_prompt + 1)))


def step(s):
    """schedule, then as postprocess: computed tokens, a new token for each request done prefilling."""
    batch = s.schedule()
    for r, n in batch:
        if s.computed(r, n):
            r.tokens.append(0)
    return [(r.tokens[0], n) for r, n in batch]


def test_chunked_prefill_runs_beside_the_decoding_requests():
    """Two decoding requests keep their one token per step while a 50-token prompt is prefilled in
    chunks of what is left of the 16-token budget; the budget is never exceeded."""
    s = scheduler.Scheduler(kv_blocks.BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=16)
    a, b = req(3), req(5)
    s.add(a), s.add(b)
    step(s)  # both prefilled in one step (8 tokens)
    long = req(50)
    long.tokens = [t + 100 for t in long.tokens]  # no prefix shared with a and b
    s.add(long)
    seen = [step(s) for _ in range(4)]
    assert seen == [[(1, 1), (1, 1), (101, 14)], [(1, 1), (1, 1), (101, 14)],
                    [(1, 1), (1, 1), (101, 14)], [(1, 1), (1, 1), (101, 8)]]
    assert long.num_computed == 50 and len(long.tokens) == 51  # its first token came with its last chunk


def test_preemption_frees_the_newest_and_recomputes_it():
    """With 6 blocks of 4 for three growing requests, the newest is preempted (back to the head of
    the queue, its blocks free), the others go on; when they finish it is recomputed from its
    prompt and what it had generated."""
    s = scheduler.Scheduler(kv_blocks.BlockManager(6, 4, prefix_caching=False), max_num_seqs=3,
                            max_num_batched_tokens=64)
    reqs = [req(7), req(7), req(7)]
    for r in reqs:
        s.add(r)
    step(s)
    assert [len(r.table) for r in reqs] == [2, 2, 2]
    step(s)  # tokens 8: still 2 blocks each
    step(s)  # token 9 needs a third block: none free, the newest yields
    assert s.preemptions == 1 and s.waiting[0] is reqs[2] and reqs[2].table == [] and reqs[2].num_computed == 0
    assert len(reqs[2].tokens) == 9  # its 2 generated tokens stay: recomputed with the prompt
    assert [len(r.table) for r in reqs[:2]] == [3, 3]
    for r in reqs[:2]:
        s.finish(r)
    assert step(s) == [(1, 9)] and s.blocks.num_free() == 6 - 3


def test_max_num_seqs_and_bad_budgets():
    s = scheduler.Scheduler(kv_blocks.BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for _ in range(3):
        s.add(req(4))
    assert len(step(s)) == 2 and len(s.waiting) == 1
    with pytest.raises(NanoError, match="max_num_seqs"):
        scheduler.Scheduler(kv_blocks.BlockManager(4, 4), 0, 16)
