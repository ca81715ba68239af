"""kv_blocks.py: the block manager's prefix cache (chained hashes, whole-block prompts, ref counts,
LRU eviction) and the paged pool's gather against a plain copy of each request's keys."""

import pytest
import torch

import gpt
import kv_blocks
from common import NanoError


def computed(bm, tokens, table):
    """As the engine does after a prefill: name the full blocks of tokens."""
    bm.commit(tokens, table, 0, len(tokens))


def test_a_prefix_hit_needs_the_same_tokens_before_it():
    """Block 2 of a prompt hits only after the same blocks 0 and 1 (the hash is chained); the
    same tokens at another place in another prompt do not hit."""
    bm = kv_blocks.BlockManager(16, 4)
    a = list(range(12)) + [99]
    table = bm.allocate(4)
    computed(bm, a, table)
    assert bm.match_prefix(a) == table[:3]
    assert bm.match_prefix(list(range(8)) + [0, 0, 0, 0, 1]) == table[:2]
    assert bm.match_prefix([50, 51, 52, 53] + list(range(4, 12)) + [1]) == []  # blocks 1-2 alone: no hit
    assert bm.match_prefix(list(range(11))) == table[:2]  # a partial block is never cached


def test_a_prompt_of_whole_cached_blocks_recomputes_its_last_block():
    """nano-vllm's #144: a prompt that is exactly 3 cached blocks gets 2 from the cache, so its
    last token is computed and gives the logits of the first new token."""
    bm = kv_blocks.BlockManager(8, 4)
    prompt = list(range(12))
    table = bm.allocate(3)
    computed(bm, prompt, table)
    assert bm.match_prefix(prompt) == table[:2]
    assert bm.match_prefix(prompt + [5]) == table  # one more token: all three


def test_ref_counts_and_lru_eviction():
    """Two requests share a cached block: it stays out of the free list until both release it.
    Freed cached blocks still hit until reused; the least recently freed goes first, and an
    evicted block no longer hits."""
    bm = kv_blocks.BlockManager(4, 2)
    first = bm.allocate(2)
    computed(bm, [1, 2, 3, 4], first)
    hit = bm.match_prefix([1, 2, 3, 4, 5])
    bm.acquire(hit)
    assert hit == first and bm.num_free() == 2
    bm.release(first)
    assert bm.num_free() == 2  # still held by the second request
    bm.release(hit)
    assert bm.num_free() == 4 and bm.match_prefix([1, 2, 3, 4, 5]) == first  # free, still cached
    other = bm.allocate(2)  # the two never-used blocks go first (the cached ones were freed later)
    assert set(other).isdisjoint(first)
    computed(bm, [7, 8, 9, 10], other)
    bm.release(other)  # freed after `first`: `first` is least recently freed, evicted next
    assert bm.allocate(1)[0] == first[1]  # a request's last block is freed first, so evicted first
    assert bm.match_prefix([1, 2, 3, 4, 5]) == first[:1] and bm.match_prefix([7, 8, 9, 10, 0]) == other
    assert bm.allocate(4) is None and bm.num_free() == 3  # not enough: nothing taken


def test_a_prefix_computed_twice_keeps_one_entry():
    """Two requests with the same prompt admitted in one step both compute it: the second copy
    is named (its successors chain from it) but the table keeps the first; freeing and evicting
    the second copy leaves the first hit."""
    bm = kv_blocks.BlockManager(8, 2)
    a, b = bm.allocate(3), bm.allocate(3)
    tokens = [1, 2, 3, 4, 5, 6]
    computed(bm, tokens, a)
    computed(bm, tokens, b)
    assert bm.match_prefix(tokens + [0]) == a
    bm.release(b)
    bm.allocate(5)  # evicts b's blocks (and the 2 never used)
    assert bm.match_prefix(tokens + [0]) == a


def test_bad_sizes_raise():
    with pytest.raises(NanoError, match="at least one block"):
        kv_blocks.BlockManager(0, 16)


def test_pool_gather_equals_each_requests_keys():
    """A step of two requests (2 and 3 new tokens after 3 and 0 cached ones) writes its keys into
    their blocks and reads back, for each request, exactly its own keys in order; padding reads
    slot 0 under a False mask."""
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=10, n_layer=1, n_head=2, n_embd=8)).eval()
    kv = kv_blocks.PagedKV(model, num_blocks=6, block_size=2)
    segments = [([1, 2], 3, [5, 1, 3]), ([4, 5, 6], 0, [0, 2])]
    idx, pos, mask, views = kv.batch(segments, [[0, 1]])
    assert idx.tolist() == [[1, 2, 4, 5, 6]] and pos.tolist() == [[3, 4, 0, 1, 2]]
    k = torch.randn(1, 2, 5, 4)
    keys, _ = views[0].update(None, k, k)
    assert torch.equal(keys[0].transpose(0, 1)[:3], kv.k[0][[10, 11, 2]])  # request 0: slots of positions 0-2
    assert torch.equal(keys[0].transpose(0, 1)[3:5], k[0, :, :2].transpose(0, 1))
    assert torch.equal(keys[0].transpose(0, 1)[5:], k[0, :, 2:].transpose(0, 1))
    assert mask.shape == (1, 1, 5, 8)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0],
                                          [0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0],
                                          [0, 0, 0, 0, 0, 1, 1, 1]]
    _, _, mask, views = kv.batch([([7], 4, [5, 1, 3]), ([8], 3, [0, 2])], [[0], [1]])  # decode rows
    assert views[0].gather.tolist() == [[10, 11, 2, 3, 6], [0, 1, 4, 5, 0]]
    assert mask[:, 0, 0].int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
