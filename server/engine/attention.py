"""Attention over the engine's KV cache, plugged into transformers' own attention interface.

Prefill runs transformers' model code unforked: the engine registers one attention function and runs every step
as a single packed sequence `[1, N]` (each row's tokens one after another, no padding). The
model computes q, k, v and the rotary embedding as always; `StepCache.update` writes k and v
into the pool at the step's columns and hands this layer's pool to the function below, which
reads the `AttentionLayout` the runner passed with the forward call and runs SDPA over views of
the pool (a Llama model's decode steps come from `lean_decode.py`, which writes the pool itself and
calls the same function with the same layouts):

- a prefill chunk: its queries against its own row's columns, causal (lower-right aligned when
  the chunk continues a prompt); one call per row, so attention work follows each row's length;
- decode: one call per block of equal-size slots (`kv_cache.py`), the block's slots as a batch,
  keys up to the longest row in that block, a boolean mask for the shorter ones (the columns
  behind it still enter the products, so they must be finite: the cache zeroes a freed slot's);
- decode of a single row (`SingleDecode`): its query against exactly its own columns, no index
  tensor, no mask and no copy in or out (one person chatting alone runs this at every step);
- a compiled decode step (`compiled.py`): the same result from index tensors of fixed meaning
  (`DecodeIndex`), so one captured graph serves every mix of rows;
- decode on a CPU where the runner built `attention_kernel.DecodeKernel` (`KernelDecode`): every row
  against exactly its own columns in one call per layer, no groups and no mask; the grouped SDPA calls
  above serve where it is not there (a GPU, no compiler, `REFT_ATTENTION_KERNEL=false`).

Any forward without a layout (training, reference checks) is plain SDPA.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.attention_kernel import DecodeKernel, RowColumns
from server.engine.kv_cache import Slot

ATTENTION_NAME = "reft_slots"
LAYOUT_KWARG = "reft_attention"


@dataclass(frozen=True)
class DecodeGroup:
    """Rows decoding in one block: its slots are one strided view [slots, kv_heads, slot_size, head_dim]."""

    start: int  # first column of the view
    slot_size: int
    slots: int  # slots in the view: the highest used index + 1
    kv_len: int  # keys read per slot: the longest row's length
    query_index: Tensor  # [n] the rows' places in the packed step
    slot_index: Tensor | None  # [n] each row's slot in the view; None when the rows are slots 0..n-1 in order
    mask: Tensor | None  # [slots, 1, 1, kv_len], True = attend; None when every slot reads kv_len keys


@dataclass(frozen=True)
class PrefillSpan:
    """One row's chunk of prompt: `length` queries at `offset` in the step, keys = its first `kv_len` columns."""

    offset: int
    length: int
    start: int  # the row's first column
    kv_len: int
    mask: Tensor | None  # [length, kv_len] when the chunk continues a prompt; None = plain causal


@dataclass(frozen=True)
class DecodeIndex:
    """A decode step as tensors only: row b's keys are columns starts[b] + key_offsets[:lengths[b]].

    Its shapes are the only thing that varies from step to step (rows, and the longest row's keys),
    so torch.compile captures it once with both sizes symbolic, where the grouped layout above would
    be a different Python structure at every step.
    """

    starts: Tensor  # [B] each row's first column
    lengths: Tensor  # [B] each row's keys, this step's included
    key_offsets: Tensor  # [L] arange(L), L >= every length


@dataclass(frozen=True)
class SingleDecode:
    """A decode step of one row: its keys are columns [start, start + kv_len), nothing beyond them."""

    start: int
    kv_len: int


@dataclass(frozen=True)
class KernelDecode:
    """A decode step through `kernel`, each row against its `columns`."""

    kernel: DecodeKernel
    columns: RowColumns


@dataclass(frozen=True)
class AttentionLayout:
    decode: tuple[DecodeGroup, ...] = ()
    prefill: tuple[PrefillSpan, ...] = ()


# What the runner passes with a forward: which pool columns each query reads.
Layout = AttentionLayout | SingleDecode | DecodeIndex | KernelDecode


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through `attention` (plain SDPA whenever no layout is passed)."""
    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def decode_layout(
    slots: Sequence[Slot], lengths: Sequence[int], block_tokens: int, device: torch.device
) -> AttentionLayout | SingleDecode:
    """Group decode rows by block. `lengths[i]` = row i's keys after this step's token is written.

    Slots of a block's size or more (one a block, or a run of blocks) group too, where they lie end to end
    with equal sizes: one SDPA call then spreads its rows' key heads over the threads, where a call per row
    gave two threads three key heads (at 16 rows of 1,024 keys, 2.2 against 1.5 ms of attention a layer).
    """
    if len(slots) == 1:
        return SingleDecode(slots[0].start, lengths[0])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # (first column, slot size) -> rows
    place: dict[int, int] = {}  # row -> its slot's place in its group
    chain: tuple[int, int, int] | None = None  # the open run of whole-block slots: (first column, size, next place)
    for i in sorted(range(len(slots)), key=lambda i: slots[i].start):
        slot = slots[i]
        if slot.size < block_tokens:
            key = (slot.block * block_tokens, slot.size)
            place[i] = slot.index
        else:
            if chain is None or chain[1] != slot.size or chain[0] + chain[2] * slot.size != slot.start:
                chain = (slot.start, slot.size, 0)
            key, place[i] = (chain[0], slot.size), chain[2]
            chain = (chain[0], chain[1], chain[2] + 1)
        groups[key].append(i)
    out = []
    for (start, size), rows in groups.items():
        index = [place[i] for i in rows]
        lens = [lengths[i] for i in rows]
        n_slots, kv_len = index[-1] + 1, max(lens)
        dense = index == list(range(len(rows)))
        mask = None
        if not dense or min(lens) < kv_len:
            per_slot = [1] * n_slots  # an unused slot reads one (zero or stale) column; its output is dropped
            for i, n in zip(index, lens, strict=True):
                per_slot[i] = n
            limit = torch.tensor(per_slot, device=device).view(-1, 1, 1, 1)
            mask = torch.arange(kv_len, device=device) < limit
        out.append(DecodeGroup(
            start=start, slot_size=size, slots=n_slots, kv_len=kv_len,
            query_index=torch.tensor(rows, device=device),
            slot_index=None if dense else torch.tensor(index, device=device), mask=mask,
        ))
    return AttentionLayout(decode=tuple(out))


def prefill_layout(spans: Sequence[tuple[int, int, int, int]], device: torch.device) -> AttentionLayout:
    """`spans`: (offset in the step, chunk length, the row's first column, prompt position of the chunk)."""
    out = []
    for offset, length, start, position in spans:
        kv_len = position + length
        mask = None
        if position > 0:  # query j sits at prompt position `position + j` and sees keys up to it
            mask = torch.arange(kv_len, device=device) <= torch.arange(position, kv_len, device=device).view(-1, 1)
        out.append(PrefillSpan(offset, length, start, kv_len, mask))
    return AttentionLayout(prefill=tuple(out))


def attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: object,
) -> tuple[Tensor, None]:
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if isinstance(layout, DecodeIndex):
        return indexed_decode(query, key, value, layout, scaling), None
    if isinstance(layout, SingleDecode):
        return single_row(query, key, value, layout.start, layout.kv_len, scaling), None
    if isinstance(layout, KernelDecode):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return layout.kernel(query, key, value, layout.columns, scale), None
    # query [1, heads, N, dim]; key/value: this layer's pool [kv_heads, capacity, dim]
    heads, kv_heads, dim = query.shape[1], key.shape[0], key.shape[2]
    gqa = heads != kv_heads
    out = query.new_empty(query.shape[2], heads, dim)
    for span in layout.prefill:
        q = query[:, :, span.offset : span.offset + span.length]
        k = key[:, span.start : span.start + span.kv_len].unsqueeze(0)
        v = value[:, span.start : span.start + span.kv_len].unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, is_causal=span.mask is None, scale=scaling,
                                           enable_gqa=gqa)
        out[span.offset : span.offset + span.length] = o[0].transpose(0, 1)
    for g in layout.decode:
        q = _grouped_queries(query[0].index_select(1, g.query_index).transpose(0, 1), kv_heads)  # [n, kvh, g, dim]
        if g.slot_index is not None:
            q = q.new_zeros((g.slots, *q.shape[1:])).index_copy_(0, g.slot_index, q)
        columns = slice(g.start, g.start + g.slots * g.slot_size)
        k = key[:, columns].view(kv_heads, g.slots, g.slot_size, dim).transpose(0, 1)[:, :, : g.kv_len]
        v = value[:, columns].view(kv_heads, g.slots, g.slot_size, dim).transpose(0, 1)[:, :, : g.kv_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling).flatten(1, 2)  # [slots, heads, d]
        if g.slot_index is not None:
            o = o.index_select(0, g.slot_index)
        out.index_copy_(0, g.query_index, o)
    return out.unsqueeze(0), None


def _grouped_queries(query: Tensor, kv_heads: int) -> Tensor:
    """Decode queries [n, heads, dim] as [n, kv_heads, heads / kv_heads, dim]: the query heads that read one key
    head (heads kv * g ... kv * g + g - 1, as transformers' repeat_kv and SDPA's enable_gqa pair them) become
    that head's query positions.

    Why: with one query per row, SDPA's CPU kernel with enable_gqa ran a product of one query row per head
    against the keys; as three positions of one head, it reads each key head once for all three, and ran
    about 2x faster at 128 and at 1,024 keys (2-core AMD EPYC). No causal mask is involved: every query of
    a decode row sees all of the row's keys, so the result is the same attention.
    """
    return query.unflatten(1, (kv_heads, -1))


def single_row(query: Tensor, key: Tensor, value: Tensor, start: int, kv_len: int, scaling: float | None) -> Tensor:
    """One row's query [1, heads, 1, dim] against its columns [start, start + kv_len) of a layer's pool, read in
    place; [1, 1, heads, dim]."""
    k = key[:, start : start + kv_len].unsqueeze(0)
    v = value[:, start : start + kv_len].unsqueeze(0)
    q = query.reshape(1, key.shape[0], -1, query.shape[-1])  # `_grouped_queries` of the row, one view
    return F.scaled_dot_product_attention(q, k, v, scale=scaling).reshape(1, 1, -1, query.shape[-1])


def indexed_decode(query: Tensor, key: Tensor, value: Tensor, index: DecodeIndex, scaling: float | None) -> Tensor:
    """Decode attention from index tensors: each row's keys gathered from the pool, then two batched matmuls.

    The gather copies rows x keys columns per layer (what the grouped eager path avoids), but as one
    contiguous copy per layer it costs less than the alternatives inductor offers: written as
    products summed over the head dimension, its kernels fused them into the softmax and recomputed
    them for each of its passes (about 3x slower at 32 rows). query [1, heads, B, dim] -> [1, B, heads, dim].
    """
    kv_heads, dim = key.shape[0], key.shape[2]
    heads, rows = query.shape[1], query.shape[2]
    columns = index.starts[:, None] + index.key_offsets[None, :]  # [B, L]
    valid = index.key_offsets[None, :] < index.lengths[:, None]
    columns = torch.where(valid, columns, index.starts[:, None])  # past a row's keys: its first column, masked
    # per (key head, row): the group of query heads that read that key head, against the row's keys
    q = query[0].reshape(kv_heads, heads // kv_heads, rows, dim).transpose(1, 2)  # [kvh, B, g, dim]
    scores = torch.matmul(q, key[:, columns].transpose(-1, -2)) * (scaling or dim**-0.5)  # [kvh, B, g, L]
    weights = scores.masked_fill(~valid[None, :, None, :], float("-inf")).softmax(-1)
    out = torch.matmul(weights, value[:, columns])  # [kvh, B, g, dim]
    return out.permute(1, 0, 2, 3).reshape(rows, heads, dim).unsqueeze(0)
