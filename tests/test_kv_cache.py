"""The KV cache's allocator: slots inside blocks, runs of blocks, the budget, and reuse."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.kv_cache import MIN_SLOT_TOKENS, CacheFull, KVCache

CPU = torch.device("cpu")


def make(budget_tokens: int, layers: int = 2, kv_heads: int = 3, head_dim: int = 8) -> KVCache:
    per_token = 2 * layers * kv_heads * head_dim * 4
    return KVCache(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32, device=CPU,
                   budget_bytes=budget_tokens * per_token)


def test_the_pool_is_allocated_once_within_the_budget():
    cache = make(10_000)
    assert cache.bytes_per_token == 2 * 2 * 3 * 8 * 4
    assert cache.capacity <= 10_000 and cache.nbytes <= 10_000 * cache.bytes_per_token
    assert cache.capacity == cache.num_blocks * cache.block_tokens and cache.num_blocks >= 16
    assert len(cache.k) == len(cache.v) == 2
    assert all(t.shape == (3, cache.capacity, 8) for t in cache.k + cache.v)
    assert not any(t.any() for t in cache.k + cache.v), "columns never written read as zeros"


def test_a_budget_below_one_slot_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="holds 3 tokens"):
        make(3)


def test_slot_sizes_follow_the_reservation_not_the_longest_row():
    cache = make(40_000)
    short, long = cache.allocate(70), cache.allocate(900)
    assert short.size == 128 and long.size == 1024
    assert cache.slot_size(1) == MIN_SLOT_TOKENS
    assert cache.used_tokens == 128 + 1024
    assert cache.usage == pytest.approx((128 + 1024) / cache.capacity)


def test_rows_longer_than_a_block_get_a_run_of_whole_blocks():
    cache = make(40_000)
    big = cache.allocate(cache.block_tokens * 2 + 1)
    assert big.blocks == 3 and big.size == 3 * cache.block_tokens and big.start == big.block * cache.block_tokens


def test_slots_never_overlap_and_freed_space_is_reused():
    cache = make(20_000)
    rng = random.Random(0)
    held = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or len(held) > 40):
            cache.free(held.pop(rng.randrange(len(held))))
        else:
            try:
                held.append(cache.allocate(rng.choice([5, 60, 200, 700, cache.block_tokens + 3])))
            except CacheFull:
                cache.free(held.pop(0))
        spans = sorted((s.start, s.start + s.size) for s in held)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
        assert all(0 <= a and b <= cache.capacity for a, b in spans)
        assert cache.used_tokens == sum(s.size for s in held)
    for slot in held:
        cache.free(slot)
    assert cache.used_tokens == 0
    whole = cache.allocate(cache.capacity)  # everything came back: the whole pool is one run again
    assert whole.start == 0


def test_a_full_cache_says_so_and_frees_make_room():
    cache = make(4096)
    slots = []
    with pytest.raises(CacheFull):
        while True:
            slots.append(cache.allocate(cache.block_tokens))
    assert len(slots) == cache.num_blocks
    cache.free(slots.pop())
    slots.append(cache.allocate(cache.block_tokens))


def test_free_zeroes_the_columns_steps_wrote_and_nothing_else():
    """What a row wrote (NaN, Inf) is gone when its slot is freed, in every layer, however far its steps wrote;
    other rows' columns stay."""
    cache = make(10_000)
    mine, other = cache.allocate(100), cache.allocate(100)
    for pool in cache.k + cache.v:
        pool[:, other.start : other.start + 5] = 1.0
    cache.writing(mine, 10)
    cache.writing(mine, 40)
    cache.writing(mine, 20)  # a later step writing less does not shrink what is cleared
    for pool in cache.k + cache.v:
        pool[:, mine.start : mine.start + 20] = float("nan")
        pool[:, mine.start + 20 : mine.start + 40] = float("inf")
    cache.free(mine)
    assert not any(t.isnan().any() or t.isinf().any() for t in cache.k + cache.v)
    assert all(bool((t[:, other.start : other.start + 5] == 1.0).all()) for t in cache.k + cache.v)
    again = cache.allocate(100)
    assert again.start == mine.start
    cache.free(again)  # nothing written since: nothing to clear, and no error
