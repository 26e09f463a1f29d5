"""The batch-1 decode attention path (`attention.SingleDecode`): one row reads exactly its own columns.

Stale columns (another request's keys in a reused slot, or columns past the row's length) may hold
anything, NaN included; the lone row's output must not depend on them, and must equal plain SDPA
over the row's own keys and the grouped path's answer for the same row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.engine import attention
from server.engine.kv_cache import KVCache

CPU = torch.device("cpu")
KV_HEADS, HEADS, DIM = 3, 9, 16


def pools() -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    cache = KVCache(layers=1, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32, device=CPU,
                    budget_bytes=4096 * 2 * KV_HEADS * DIM * 4)
    key, value = cache.k[0], cache.v[0]
    key.fill_(float("nan"))
    value.fill_(float("nan"))
    return cache, key, value


def run(layout: attention.Layout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out, _ = attention.attention(torch.nn.Module(), query, key, value, None, scaling=DIM**-0.5,
                                 **{attention.LAYOUT_KWARG: layout})
    return out



def fill(key: torch.Tensor, value: torch.Tensor, start: int, length: int, seed: int) -> torch.Tensor:
    """Random keys and values in a row's first `length` columns; returns a random query for it."""
    gen = torch.Generator().manual_seed(seed)
    key[:, start : start + length] = torch.randn(KV_HEADS, length, DIM, generator=gen)
    value[:, start : start + length] = torch.randn(KV_HEADS, length, DIM, generator=gen)
    return torch.randn(1, HEADS, 1, DIM, generator=gen)

def test_a_lone_row_reads_only_its_own_columns():
    cache, key, value = pools()
    cache.allocate(20)  # slot 0 of the block, left full of NaN: another request's stale columns
    slot = cache.allocate(20)
    assert slot.index == 1
    length = 13
    query = fill(key, value, slot.start, length, seed=0)

    layout = attention.decode_layout([slot], [length], cache.block_tokens, CPU)
    assert layout == attention.SingleDecode(slot.start, length)
    out = run(layout, query, key, value)

    assert out.shape == (1, 1, HEADS, DIM)
    assert torch.isfinite(out).all(), "a NaN beyond the row's length or in another slot reached its output"
    k = key[:, slot.start : slot.start + length].unsqueeze(0).repeat_interleave(HEADS // KV_HEADS, 1)
    v = value[:, slot.start : slot.start + length].unsqueeze(0).repeat_interleave(HEADS // KV_HEADS, 1)
    expected = F.scaled_dot_product_attention(query, k, v, scale=DIM**-0.5).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_a_lone_row_matches_the_grouped_path_bit_for_bit():
    """Batch invariance: the row alone gives what the grouped decode gives it (a dense group of one slot)."""
    cache, key, value = pools()
    slot = cache.allocate(40)
    assert slot.index == 0
    length = 37
    query = fill(key, value, slot.start, length, seed=1)
    grouped = attention.AttentionLayout(decode=(attention.DecodeGroup(
        start=slot.start, slot_size=slot.size, slots=1, kv_len=length, query_index=torch.tensor([0]),
        slot_index=None, mask=None),))
    assert torch.equal(run(attention.decode_layout([slot], [length], cache.block_tokens, CPU), query, key, value),
                       run(grouped, query, key, value))
