"""The engine's KV cache: allocated once at start-up within a byte budget, written in place.

Per layer, keys and values live in one pool each, `[kv_heads, capacity, head_dim]`, a tensor of
its own (not a view of one tensor across layers: a compiled decode step writes each layer's pool
in place, and a write through a view of a shared base makes torch.compile copy the whole base at
every step). Every row
owns a contiguous range of columns (its slot), reserved when it is admitted for its prompt plus
its max_tokens, and given back when it retires. A prefill writes the row's prompt columns and a
decode step writes one column per row (`index_copy_` at the step's write positions); nothing
else is ever copied, and rows join and leave without touching each other's columns.

Why contiguous slots and not pages: attention must read a row's keys in place. With pages, SDPA
needs each row's pages gathered into one tensor first, and that gather copies the whole cache at
every layer of every step (the cost the DynamicCache concatenation had). A contiguous slot is a
plain view.

Why slots come in blocks: the pool is cut into blocks of `block_tokens` columns. A row whose
reservation fits in a block gets a slot of a power-of-two size inside a block given to that size;
a longer row gets a run of whole consecutive blocks. The slots of one block all have one size,
so the rows decoding in a block are one strided view `[slots, kv_heads, size, head_dim]` and
decode attention is one batched SDPA call per block, not one call per row (on the 2-core CPU,
32 rows at 80 tokens: 19 ms of attention per step batched, 46 ms in a loop over rows). The
price is rounding: a row holds at most twice its reservation, and a block stays with its size
while any of its slots is in use.
(On a CPU the decode attention kernel, `attention_kernel.py`, reads each row's slot by its first
column and length and needs no grouping; the blocks serve SDPA's path: a GPU, or no compiler.)

On CPU the pool is an anonymous mapping: the kernel hands out zeroed pages on first touch, so the
budget costs memory only where rows have written, and columns never written read as zeros.

Why a freed slot's written columns are zeroed: eager decode reads a shorter row's slot up to the
longest row of its block (`attention.py`), and a masked column still enters the product with V
behind a zero weight, and its key the product with Q. A NaN or Inf left there by the slot's
previous row (an fp16 overflow, say) makes 0 x NaN = NaN in the next row's output. Masking with
-inf before the softmax does not help (the weight is already 0; the product is what poisons);
sanitising the columns read behind the mask copies every group's keys and values at every layer
of every step. So the runner tells the cache how far each step writes a slot (`writing`), and
`free` zeroes exactly those columns in every layer: the columns a row reads past its own length
are then zeros, never an earlier row's values. Cost (bench/stale_kv.py; bench/RESULTS.md, 2-core
CPU, default model, float32): a decode step gains a dict update per row, 0.25 us at batch 1 and
2.6 us at batch 32, nothing measurable beside a step of tens of milliseconds; a free zeroes 46 KB
per written token, 0.23 ms for a row of 100 tokens and about 2 ms for 1,000, once per request.
Sanitising in attention instead took 1.66x the batch-32 step in the same run.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CPU_BYTES = 4 << 30
GPU_FREE_FRACTION = 0.8  # of the device memory free after the model is loaded
MAX_BLOCK_TOKENS = 8192
MIN_BLOCKS = 32  # blocks are handed to one slot size each: enough of them that many sizes can coexist
MIN_SLOT_TOKENS = 32


def default_budget(device: torch.device) -> int:
    """A fixed size on CPU; on GPU, most of the memory still free after the model is loaded."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_FRACTION)
    return DEFAULT_CPU_BYTES


@dataclass(frozen=True)
class Slot:
    """A row's columns in the pool: [start, start + size). `block`/`index` place it for batching."""

    block: int  # the first block of the slot
    index: int  # the slot's place among its block's slots (0 for a run of blocks)
    size: int  # columns reserved
    start: int  # first column
    blocks: int  # > 1 only for a run of whole blocks


class CacheFull(Exception):
    """No slot of that size is free now (the request waits for rows to retire)."""


class KVCache:
    """The pool and its allocator. Only the engine thread uses it."""

    def __init__(
        self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, budget_bytes: int
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize
        tokens = budget_bytes // self.bytes_per_token
        if tokens < MIN_SLOT_TOKENS:
            raise ValueError(
                f"the KV cache budget of {budget_bytes} bytes holds {tokens} tokens at "
                f"{self.bytes_per_token} bytes per token; it needs room for at least {MIN_SLOT_TOKENS}"
            )
        per_block = max(MIN_SLOT_TOKENS, tokens // MIN_BLOCKS)
        self.block_tokens = min(MAX_BLOCK_TOKENS, 1 << (per_block.bit_length() - 1))
        self.num_blocks = tokens // self.block_tokens
        self.capacity = self.num_blocks * self.block_tokens
        shape = (kv_heads, self.capacity, head_dim)
        self.k, self.v = _pools(layers, shape, dtype, device), _pools(layers, shape, dtype, device)
        self._free_blocks = set(range(self.num_blocks))
        self._block_size: dict[int, int] = {}  # block -> slot size, for blocks cut into slots
        self._block_free: dict[int, list[int]] = {}  # block -> its free slot indices, lowest first
        self._run_of: dict[int, int] = {}  # first block of a run -> its length in blocks
        self._written: dict[int, int] = {}  # a held slot's first column -> its columns a step may have written
        self.used_tokens = 0  # columns held by rows' slots

    @classmethod
    def for_model(cls, config: object, dtype: torch.dtype, device: torch.device, budget_bytes: int) -> KVCache:
        """A cache shaped for a transformers model config (layers, key/value heads, head size)."""
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, dtype=dtype, device=device,
            budget_bytes=budget_bytes,
        )

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_token

    @property
    def usage(self) -> float:
        """Fraction of the pool's columns that rows hold (the router's KV-cache use)."""
        return self.used_tokens / self.capacity

    def slot_size(self, tokens: int) -> int:
        """Columns a reservation of `tokens` holds once granted."""
        if tokens > self.block_tokens:
            return -(-tokens // self.block_tokens) * self.block_tokens
        return max(MIN_SLOT_TOKENS, 1 << (tokens - 1).bit_length())

    def allocate(self, tokens: int) -> Slot:
        """Reserve columns for a row of up to `tokens` tokens; raises CacheFull when none are free now."""
        size = self.slot_size(tokens)
        slot = self._allocate_run(size) if size > self.block_tokens else self._allocate_in_block(size)
        self.used_tokens += slot.size
        return slot

    def writing(self, slot: Slot, end: int) -> None:
        """A step is about to write columns up to `end` (from the slot's start) of `slot`: zeroed when it is freed."""
        if end > self._written.get(slot.start, 0):
            self._written[slot.start] = end

    def copy(self, pairs: Sequence[tuple[int, int]], tokens: int) -> None:
        """Copy `tokens` columns from each pair's first column to its second, in every layer's keys and values.

        The prefix cache's only data movement: one gather and one scatter per pool for all pairs.
        """
        if not pairs:
            return
        span = torch.arange(tokens, device=self.device)
        src = torch.cat([span + s for s, _ in pairs])
        dst = torch.cat([span + d for _, d in pairs])
        for pool in (*self.k, *self.v):
            pool.index_copy_(1, dst, pool.index_select(1, src))

    def free(self, slot: Slot) -> None:
        """Give the slot back, its written columns zeroed in every layer (see the module's docstring)."""
        written = self._written.pop(slot.start, 0)
        for pool in (*self.k, *self.v):
            pool[:, slot.start : slot.start + written].zero_()
        self.used_tokens -= slot.size
        if slot.size >= self.block_tokens:  # a run of whole blocks
            del self._run_of[slot.block]
            self._free_blocks.update(range(slot.block, slot.block + slot.blocks))
            return
        free = self._block_free[slot.block]
        free.append(slot.index)
        free.sort()
        if len(free) == self.block_tokens // slot.size:  # the block is empty: any size may take it
            del self._block_free[slot.block], self._block_size[slot.block]
            self._free_blocks.add(slot.block)

    def _allocate_in_block(self, size: int) -> Slot:
        if size == self.block_tokens:  # a whole block: a run of one
            return self._allocate_run(size)
        # Fill the fullest block of this size first, so that empty blocks stay whole for others.
        blocks = [b for b, s in self._block_size.items() if s == size and self._block_free[b]]
        if blocks:
            block = min(blocks, key=lambda b: (len(self._block_free[b]), b))
        elif self._free_blocks:
            block = max(self._free_blocks)  # from the top: runs take from the bottom
            self._free_blocks.remove(block)
            self._block_size[block] = size
            self._block_free[block] = list(range(self.block_tokens // size))
        else:
            raise CacheFull(size)
        index = self._block_free[block].pop(0)
        return Slot(block, index, size, block * self.block_tokens + index * size, 1)

    def _allocate_run(self, size: int) -> Slot:
        count = size // self.block_tokens
        run = 0
        for block in range(self.num_blocks):  # first fit from the bottom
            run = run + 1 if block in self._free_blocks else 0
            if run == count:
                first = block - count + 1
                self._free_blocks.difference_update(range(first, first + count))
                self._run_of[first] = count
                return Slot(first, 0, size, first * self.block_tokens, count)
        raise CacheFull(size)


def _pools(layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """One tensor per layer; on CPU all of them in one anonymous mapping (zero pages until written)."""
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    numel = 1
    for n in shape:
        numel *= n
    buffer = mmap.mmap(-1, layers * numel * dtype.itemsize)
    return [torch.frombuffer(buffer, dtype=dtype, count=numel, offset=i * numel * dtype.itemsize).view(shape)
            for i in range(layers)]


class StepCache:
    """What the model sees as `past_key_values` during one forward: it writes the step's keys and
    values into the pool at `columns` (one per packed token) and returns the layer's whole pool, which
    the engine's attention function reads through views (`attention.py`)."""

    is_compileable = False

    def __init__(self, cache: KVCache, columns: Tensor) -> None:
        self.cache, self.columns = cache, columns

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k.index_copy_(1, self.columns, key[0])  # key: [1, kv_heads, N, dim]
        v.index_copy_(1, self.columns, value[0])
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, cache_position: Tensor, layer_idx: int) -> tuple[int, int]:
        """No mask is built for engine steps: the layout carries each row's extent."""
        return int(cache_position.shape[0]), 0
