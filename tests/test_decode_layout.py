"""Decode rows grouped into SDPA calls (`attention.decode_layout`): rows of long slots lying end to end share
one call, and every row still reads exactly its own keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.engine import attention
from server.engine.kv_cache import KVCache, Slot

CPU = torch.device("cpu")
KV_HEADS, HEADS, DIM = 3, 9, 16


def cache_of(tokens: int = 4096) -> KVCache:
    cache = KVCache(layers=1, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32, device=CPU,
                    budget_bytes=tokens * 2 * KV_HEADS * DIM * 4)
    gen = torch.Generator().manual_seed(0)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    return cache


def reference(query: torch.Tensor, cache: KVCache, slots: list[Slot], lengths: list[int]) -> torch.Tensor:
    """Plain SDPA of each row over its own keys, the key heads repeated as transformers does. [1, N, heads, dim]"""
    out = []
    for i, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
        k = cache.k[0][:, slot.start : slot.start + n].unsqueeze(0).repeat_interleave(HEADS // KV_HEADS, 1)
        v = cache.v[0][:, slot.start : slot.start + n].unsqueeze(0).repeat_interleave(HEADS // KV_HEADS, 1)
        out.append(F.scaled_dot_product_attention(query[:, :, i : i + 1], k, v, scale=DIM**-0.5)[0, :, 0])
    return torch.stack(out).unsqueeze(0)


def attend(cache: KVCache, slots: list[Slot], lengths: list[int]) -> tuple[attention.AttentionLayout, torch.Tensor]:
    layout = attention.decode_layout(slots, lengths, cache.block_tokens, CPU)
    query = torch.randn(1, HEADS, len(slots), DIM, generator=torch.Generator().manual_seed(1))
    out, _ = attention.attention(torch.nn.Module(), query, cache.k[0], cache.v[0], None, scaling=DIM**-0.5,
                                 **{attention.LAYOUT_KWARG: layout})
    torch.testing.assert_close(out, reference(query, cache, slots, lengths), rtol=1e-5, atol=1e-5)
    return layout, out


def test_long_slots_end_to_end_share_one_call():
    cache = cache_of()
    slots = [cache.allocate(200) for _ in range(3)]  # runs of two blocks each
    assert all(s.blocks == 2 for s in slots)
    assert sorted(s.start for s in slots) == [slots[0].start + i * slots[0].size for i in range(3)]
    layout, _ = attend(cache, slots, [150, 200, 7])
    (group,) = layout.decode
    assert (group.slots, group.slot_index) == (3, None) and group.mask is not None


def test_block_sized_slots_end_to_end_share_one_call():
    cache = cache_of()
    slots = [cache.allocate(cache.block_tokens) for _ in range(4)]
    assert all(s.size == cache.block_tokens for s in slots)
    layout, _ = attend(cache, slots, [cache.block_tokens] * 4)
    (group,) = layout.decode
    assert (group.slots, group.slot_index, group.mask) == (4, None, None)


def test_a_gap_or_another_size_starts_a_new_call():
    cache = cache_of()
    a, gap, b = (cache.allocate(200) for _ in range(3))
    cache.free(gap)
    c = cache.allocate(500)  # a run of another size
    small = cache.allocate(20)  # a slot inside a block
    layout, _ = attend(cache, [b, small, c, a], [100, 20, 499, 3])
    assert len(layout.decode) == 4
    assert all(g.slots == 1 and g.slot_index is None for g in layout.decode)
