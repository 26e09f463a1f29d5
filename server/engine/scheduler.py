"""The scheduling policy: which waiting requests join, which prompt chunks a prefill step computes,
which rows decode, and when a row leaves. No thread, no model, no device: `EngineLoop`
(server/engine/loop.py) runs the plans, so the policy is tested with fake rows and a fake KV
allocator (tests/test_scheduler_policy.py).

Each engine iteration asks `schedule()` for a `StepPlan`, runs it, and reports what each row's
step produced through `update()`. The rules, each written once here:

- Admission is first come, first served, with no overtaking and no eviction: the head of the
  queue joins while the batch has a free row and the KV cache can reserve its prompt plus
  max_tokens (`_reserve`); when it cannot, nothing behind it joins either, and no running row is
  ever pre-empted to make room. A reservation is never grown, so a running row never waits.
- A prefill step computes the next chunk of each admitted prompt, in arrival order, at most
  `prefill_chunk_tokens` tokens in all while rows are decoding, so a long prompt is spread over
  several steps and stalls running streams by one chunk at most; with nothing decoding, a burst
  is prefilled up to `max_prefill_tokens` at once.
- Every decoding row decodes every step, those whose prompt this step's prefill completes included.
- A row leaves through `_retire` only: its KV reservation and its row index are given back.
- With a prefix cache (server/engine/prefix_cache.py), a row's reservation copies the longest
  cached prefix of its prompt into its columns and its prefill starts after it (`computed`); its
  full blocks are stored when its prompt is complete and when it retires (unless it failed).
  Cached blocks are free space: a reservation that cannot be granted evicts them, least recently
  used first, and only when none is left does the request wait, so the cache never refuses or
  delays what would be admitted without it and never takes a running row's columns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.engine.adapter_cache import AdapterRef, ResidentAdapter
from server.engine.kv_cache import CacheFull, Slot
from server.engine.prefix_cache import Acting, PrefixCache, acting, block_keys
from server.engine.sampling import SamplingParams
from server.engine.structured import CompiledGrammar

if TYPE_CHECKING:
    from server.engine.output import Event

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status that fits."""

    status = 400
    kind = "invalid_request_error"


class QueueFull(EngineError):
    status = 429
    kind = "overloaded"


class PromptTooLong(EngineError):
    status = 400


class EngineStopped(EngineError):
    status = 503
    kind = "unavailable"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    on_event: Callable[[Event], None]
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    grammar: CompiledGrammar | None = None  # constrained decoding: the output must match it

    def cancel(self) -> None:
        """Ask the engine to drop this request; its row leaves before the next step."""
        self.cancelled = True


class KVAllocator(Protocol):
    """What the policy needs of the KV cache (server/engine/kv_cache.py's `KVCache`)."""

    capacity: int
    bytes_per_token: int
    used_tokens: int

    @property
    def nbytes(self) -> int: ...

    @property
    def usage(self) -> float: ...

    def slot_size(self, tokens: int) -> int: ...

    def allocate(self, tokens: int) -> Slot: ...

    def free(self, slot: Slot) -> None: ...

    def writing(self, slot: Slot, end: int) -> None: ...

    def copy(self, pairs: list[tuple[int, int]], tokens: int) -> None: ...


@dataclass(eq=False)
class Sequence:
    """An admitted request: its KV columns, its row in the sampler's tables, its progress."""

    request: GenerationRequest
    slot: Slot  # KV columns, reserved for the prompt plus max_tokens
    row: int  # the row of the sampler's and the grammar matcher's tables
    resident: ResidentAdapter | None = None
    computed: int = 0  # prompt tokens already in the KV columns
    cached: int = 0  # of those, copied from the prefix cache at admission
    acts: Acting | None = None  # the request's interventions, as the prefix cache keys them
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the prompt's full blocks
    stored: int = 0  # leading blocks of this row that the prefix cache holds
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + length) of one row, for one prefill step."""

    seq: Sequence
    start: int
    length: int

    @property
    def tokens(self) -> list[int]:
        return self.seq.prompt[self.start : self.start + self.length]

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.seq.prompt)


@dataclass(frozen=True)
class StepPlan:
    """What one engine iteration does, in this order."""

    cancelled: tuple[GenerationRequest, ...] = ()  # left the queue unadmitted: answer "cancelled"
    admitted: tuple[Sequence, ...] = ()  # joined: KV reserved, row taken, adapter resident
    failed: tuple[tuple[Sequence, str], ...] = ()  # could not join (adapter): answer the error; nothing held
    retired: tuple[Sequence, ...] = ()  # cancelled while held, already retired: answer "cancelled"
    prefill: tuple[Chunk, ...] = ()
    decode: tuple[Sequence, ...] = ()  # skip those that finish during this step's prefill


@dataclass(frozen=True)
class RowOutput:
    """What one step did for one row: prompt tokens computed, the token sampled, the finish if any."""

    seq: Sequence
    computed: int = 0
    token: int | None = None
    finish_reason: str | None = None


class Scheduler:
    def __init__(
        self,
        kv: KVAllocator,
        resident: Callable[[AdapterRef], ResidentAdapter],
        *,
        max_batch_size: int,
        max_queue: int,
        max_prefill_tokens: int,
        max_prompt_tokens: int,
        max_context: int,
        prefill_chunk_tokens: int = 512,
        batch_wait: float = 0.0,
        batch_quiet: float = 0.0,
        prefix: PrefixCache[Slot] | None = None,
        prefix_keyed_by_adapter: bool = False,
    ) -> None:
        self.kv = kv
        self.prefix = prefix
        self.prefix_keyed_from = 0 if prefix_keyed_by_adapter else None
        self.resident = resident  # makes an adapter resident on the device; raises when it cannot
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_context = max_context
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.batch_wait = batch_wait
        self.batch_quiet = batch_quiet
        self.waiting: deque[GenerationRequest] = deque()
        self.prefilling: list[Sequence] = []  # admitted, KV held, prompt not yet fully computed
        self.running: list[Sequence] = []  # decoding
        self._free_rows = list(range(max_batch_size - 1, -1, -1))  # popped from the end: row 0 first

    # ---- the queue --------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def room(self) -> int:
        """Requests the queue holds at most now: its own length, plus the batch's free rows that they would start in."""
        return self.max_queue + max(self.max_batch_size - self.num_running, 0)

    @property
    def idle(self) -> bool:
        """No row is held."""
        return not self.running and not self.prefilling

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def running_adapters(self) -> list[str]:
        seqs = list(self.running) + list(self.prefilling)
        return sorted({s.request.adapter.name for s in seqs if s.request.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({r.adapter.name for r in list(self.waiting) if r.adapter})

    def kv_usage(self) -> float:
        """Fraction of the KV cache's columns that rows hold: cached prefix blocks are free space."""
        cached = self.prefix.tokens if self.prefix is not None else 0
        return (self.kv.used_tokens - cached) / self.kv.capacity

    def reservation(self, prompt_length: int, max_new_tokens: int) -> int:
        """KV columns a request holds while it runs: its prompt plus every token it may generate."""
        return min(prompt_length + max_new_tokens, self.max_context)

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse what can never run, with the numbers, before it takes a place in the queue."""
        if prompt_length == 0:
            raise EngineError("the prompt is empty")
        if prompt_length > self.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt has {prompt_length} tokens; this server accepts at most {self.max_prompt_tokens}"
            )
        if prompt_length + max_new_tokens > self.max_context:
            raise PromptTooLong(
                f"the prompt has {prompt_length} tokens and max_tokens is {max_new_tokens}: "
                f"{prompt_length + max_new_tokens} exceeds the model's context of {self.max_context} tokens"
            )
        need = self.kv.slot_size(self.reservation(prompt_length, max_new_tokens))
        if need > self.kv.capacity:
            raise PromptTooLong(
                f"the prompt has {prompt_length} tokens and max_tokens is {max_new_tokens}: that needs {need} tokens "
                f"of KV cache ({need * self.kv.bytes_per_token} bytes) and this server's KV cache holds "
                f"{self.kv.capacity} tokens ({self.kv.nbytes} bytes, REFT_KV_CACHE_BYTES)"
            )

    def add(self, request: GenerationRequest) -> None:
        """Queue a checked request; the queue holds `max_queue` beyond the batch's free rows (`room`)."""
        if len(self.waiting) >= self.room:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        self.waiting.append(request)

    def burst_wait(self, now: float) -> float:
        """Seconds an idle engine should still wait for a burst to finish arriving (0: go now).

        Requests sent together arrive a few milliseconds apart; prefilling the first alone costs
        an extra forward pass. So an idle engine waits while requests keep coming less than
        `batch_quiet` seconds apart, at most `batch_wait` seconds after the first, and never once
        the waiting requests fill a batch or the prefill token budget. A lone request waits
        `batch_quiet`.
        """
        if self.batch_wait <= 0 or not 0 < len(self.waiting) < self.max_batch_size:
            return 0.0
        if sum(len(r.prompt_ids) for r in self.waiting) >= self.max_prefill_tokens:
            return 0.0
        until = min(self.waiting[0].arrival + self.batch_wait, self.waiting[-1].arrival + self.batch_quiet)
        return max(0.0, until - now)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Drop cancelled requests, admit waiting ones, and plan this step's prefill chunks and decode rows."""
        cancelled = self._drop_cancelled_waiting()
        reserved = self._admit(cancelled)
        admitted, failed = self._make_resident(reserved)
        retired = self._retire_cancelled()
        prefill = self._chunks()
        completing = [c.seq for c in prefill if c.completes_prompt and c.seq.request.params.max_new_tokens > 0]
        return StepPlan(tuple(cancelled), tuple(admitted), tuple(failed), tuple(retired), tuple(prefill),
                        (*self.running, *completing))

    def update(self, outputs: Iterable[RowOutput]) -> list[Sequence]:
        """Apply what a step did to its rows; retire those that finished and return them."""
        for out in outputs:
            seq = out.seq
            seq.computed += out.computed
            if out.computed and seq.computed == len(seq.prompt):
                self.prefilling.remove(seq)
                self.running.append(seq)
                if self.prefix is not None:  # later requests may share the prompt while this row decodes
                    self._store(seq, seq.keys)
            if out.token is not None:
                seq.token_ids.append(out.token)
            if out.finish_reason is not None:
                seq.finish_reason = out.finish_reason
        return self._retire()

    def finish(self, seq: Sequence, reason: str) -> list[Sequence]:
        """End a row outside a step's outputs (its step failed); retire it and return what retired."""
        seq.finish_reason = reason
        return self._retire()

    def abort(self) -> tuple[list[Sequence], list[GenerationRequest]]:
        """The engine stopped: retire every row (returned) and empty the queue (returned)."""
        for seq in self.running + self.prefilling:
            seq.finish_reason = "error"
        waiting = list(self.waiting)
        self.waiting.clear()
        return self._retire(), waiting

    def _drop_cancelled_waiting(self) -> list[GenerationRequest]:
        """Forget queued requests that were cancelled, wherever they sit in the queue."""
        if not any(r.cancelled for r in self.waiting):
            return []
        dropped = [r for r in self.waiting if r.cancelled]
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return dropped

    def _admit(self, cancelled: list[GenerationRequest]) -> list[Sequence]:
        """Take waiting requests in arrival order while the batch has a free row and their reservation is granted."""
        admitted: list[Sequence] = []
        while self.waiting and self.num_running + len(admitted) < self.max_batch_size:
            request = self.waiting[0]
            if request.cancelled:  # cancelled since the queue was swept
                cancelled.append(self.waiting.popleft())
                continue
            seq = self._reserve(request)
            if seq is None:
                break  # it waits, first in line, until running rows give their reservations back
            self.waiting.popleft()
            admitted.append(seq)
        return admitted

    def _reserve(self, request: GenerationRequest) -> Sequence | None:
        """The request's KV reservation and row, or None while the cache cannot grant it.

        The one place a row's KV columns are granted: cached prefix blocks are evicted here when the
        allocation fails, and once it succeeds the longest cached prefix of the prompt is copied in.
        """
        acts, keys = self._prompt_keys(request)
        try:
            slot = self._allocate(self.reservation(len(request.prompt_ids), request.params.max_new_tokens),
                                  keep=frozenset(keys), last_resort=True)
        except CacheFull:
            return None
        seq = Sequence(request, slot, self._free_rows.pop(), acts=acts, keys=keys)
        self._reuse(seq)
        return seq

    # ---- the prefix cache -------------------------------------------------------------------

    def _prompt_keys(self, request: GenerationRequest) -> tuple[Acting | None, list[bytes]]:
        """How the prefix cache knows the request's interventions, and the keys of its prompt's full blocks."""
        if self.prefix is None:
            return None, []
        ref = request.adapter
        acts = None
        if ref is not None:
            acts = acting(f"{ref.name}@{ref.version}:{ref.sha256}", ref.adapter.locations(len(request.prompt_ids)))
        keys = list(block_keys(request.prompt_ids, self.prefix.block_tokens, acts, keyed_from=self.prefix_keyed_from))
        return acts, keys

    def _allocate(self, tokens: int, keep: frozenset[bytes], last_resort: bool) -> Slot:
        """KV columns for `tokens`, evicting cached prefix blocks, least recently used first, while none are free.

        Blocks in `keep` (those the caller is about to reuse, or stores beside) go last, and only
        when `last_resort`: an admission may take them rather than wait; a store never does.
        """
        while True:
            try:
                return self.kv.allocate(tokens)
            except CacheFull:
                place = self.prefix.evict(keep) if self.prefix is not None else None
                if place is None and last_resort and self.prefix is not None:
                    place = self.prefix.evict()
                if place is None:
                    raise
                self.kv.free(place)

    def _reuse(self, seq: Sequence) -> None:
        """Copy the longest cached prefix of the row's prompt into its columns; its prefill starts after it."""
        if self.prefix is None:
            return
        size = self.prefix.block_tokens
        # The prompt's last token is always computed (its logits are sampled); an echo needs every position's logits.
        echo = seq.request.params.prompt_logprobs is not None
        found = self.prefix.match([] if echo else seq.keys[: (len(seq.prompt) - 1) // size])
        self.prefix.count(len(seq.prompt), len(found) * size)
        if found:
            self.kv.copy([(place.start, seq.slot.start + i * size) for i, place in enumerate(found)], size)
            self.kv.writing(seq.slot, len(found) * size)
        seq.computed = seq.cached = len(found) * size
        seq.stored = len(found)

    def _store(self, seq: Sequence, keys: list[bytes]) -> None:
        """Copy the row's full blocks that the prefix cache lacks out of its columns into blocks of their own."""
        assert self.prefix is not None
        size = self.prefix.block_tokens
        keep = frozenset(keys)
        pairs: list[tuple[int, int]] = []
        for index in range(seq.stored, len(keys)):
            if keys[index] not in self.prefix:
                try:
                    place = self._allocate(size, keep=keep, last_resort=False)
                except CacheFull:
                    break  # a chain is found from its start only: blocks after a missing one would never match
                self.kv.writing(place, size)
                self.prefix.insert(keys[index], place)
                pairs.append((seq.slot.start + index * size, place.start))
            seq.stored = index + 1
        self.kv.copy(pairs, size)
        self.prefix.match(keys[: seq.stored])  # the chain's first block is its most recently used

    def _written_keys(self, seq: Sequence) -> list[bytes]:
        """Keys of the row's full blocks whose KV is written: its prompt and every generated token fed back."""
        assert self.prefix is not None
        if seq.computed < len(seq.prompt):
            return seq.keys[: seq.computed // self.prefix.block_tokens]
        tokens = seq.prompt + seq.token_ids[:-1]  # the last sampled token was never fed: it has no KV
        more = block_keys(tokens, self.prefix.block_tokens, seq.acts, start=len(seq.keys),
                          parent=seq.keys[-1] if seq.keys else b"", keyed_from=self.prefix_keyed_from)
        return seq.keys + list(more)

    def _make_resident(self, reserved: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, str]]]:
        """Load the admitted rows' adapters onto the device; a row whose adapter cannot be loaded fails alone."""
        admitted: list[Sequence] = []
        failed: list[tuple[Sequence, str]] = []
        for seq in reserved:
            adapter = seq.request.adapter
            try:
                seq.resident = self.resident(adapter) if adapter else None
            except Exception as exc:  # noqa: BLE001 - the adapter's failure is its request's alone
                log.exception("loading adapter %s failed", adapter.name if adapter else None)
                seq.finish_reason = "error"
                self._give_back(seq)
                failed.append((seq, f"the adapter could not be loaded: {exc}"))
                continue
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted, failed

    def _retire_cancelled(self) -> list[Sequence]:
        for seq in self.running + self.prefilling:
            if seq.request.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        return self._retire()

    def _chunks(self) -> list[Chunk]:
        """The next chunk of each admitted prompt, in arrival order, within this step's token budget."""
        budget = self.prefill_chunk_tokens if self.running else self.max_prefill_tokens
        chunks: list[Chunk] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.computed)
            chunks.append(Chunk(seq, seq.computed, n))
            budget -= n
        return chunks

    def _retire(self) -> list[Sequence]:
        """Drop finished rows and give their reservations back; no other row's columns are touched.

        The one place rows leave: the full blocks of a row that did not fail go to the prefix cache
        before `_give_back` frees its columns.
        """
        retired: list[Sequence] = []
        for rows in (self.running, self.prefilling):
            finished = [s for s in rows if s.finish_reason is not None]
            for seq in finished:
                if self.prefix is not None and seq.finish_reason != "error":
                    self._store(seq, self._written_keys(seq))
                self._give_back(seq)
                rows.remove(seq)
            retired += finished
        return retired

    def _give_back(self, seq: Sequence) -> None:
        self.kv.free(seq.slot)
        self._free_rows.append(seq.row)
