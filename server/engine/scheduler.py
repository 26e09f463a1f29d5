"""The continuous-batching loop: admit, prefill (in chunks), decode, retire, cancel.

It runs in one background thread that owns the model and the KV cache. Each iteration admits
waiting requests (up to the batch size, and only when a KV slot for the prompt plus max_tokens
is free), runs one prefill step over the admitted prompts, then one decode step for every
running row. A prefill step computes at most `prefill_chunk_tokens` prompt tokens while rows
are decoding, so a long prompt is spread over several steps and never stalls running streams
for more than one chunk; an idle engine prefills a burst up to `max_prefill_tokens` at once.
Each row also holds a row of the batched `Sampler`'s tables. Finished and cancelled rows give
their slots back before the next step. A step that fails is
retried row by row, so an error fails only the request it belongs to. Callers submit from any
thread and receive `Event`s through the callback they pass. Background tasks (training jobs) get
a time budget per iteration, after the decode step (`_background_step` says how it is kept), so a
stream's token gap grows by about that budget while a task runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache, ResidentAdapter
from server.engine.kv_cache import CacheFull, Slot
from server.engine.prefix_cache import Acting, PrefixCache, acting, block_keys
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import (
    SampleOutput,
    Sampler,
    SamplingParams,
    TextTracker,
    TokenLogprobs,
    prompt_logprobs,
)
from server.engine.structured import CompiledGrammar, GrammarRows

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@dataclass(frozen=True)
class Event:
    """What one engine step produced for one request."""

    text: str  # new text, safe to show (never part of a stop string or of a UTF-8 character)
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None
    error_status: int = 500  # 503 when the engine stopped under the request, 500 when its own step failed
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token of token_ids, when the request asked for logprobs
    # On a request's first event, when it asked for them (echo): prompt tokens 1.. under the positions before them
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


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
        """Ask the engine to drop this request; its slot is freed before the next decode step."""
        self.cancelled = True


class BackgroundTask(Protocol):
    """Work that shares the engine thread with serving, one bounded step at a time."""

    def step(self, budget: float) -> bool:
        """Run one step of about `budget` seconds (or its smallest piece of work, if longer); True once finished."""

    def fail(self, message: str) -> None:
        """The task cannot go on (its step raised, or the engine stopped)."""


@dataclass
class _Sequence:
    request: GenerationRequest
    tracker: TextTracker
    slot: Slot  # KV columns
    row: int  # the Sampler's tables
    resident: ResidentAdapter | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    cached: int = 0  # of those, copied from the prefix cache
    acts: Acting | None = None  # the request's interventions, as the prefix cache keys them
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the prompt's full blocks
    stored: int = 0  # leading blocks of this row known to the prefix cache
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # gathered chunk by chunk (echo)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        decode_text: Callable[[list[int]], str],
        adapter_cache: DeviceAdapterCache,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int,
        max_queue: int,
        max_prefill_tokens: int,
        max_prompt_tokens: int,
        max_context: int,
        prefill_chunk_tokens: int = 512,
        batch_wait: float = 0.0,
        batch_quiet: float = 0.0,
        task_budget: float = 0.05,
        prefix_cache: PrefixCache[Slot] | None = None,
        prefix_keyed_by_adapter: bool = False,
    ) -> None:
        self.runner = runner
        self.cache = runner.cache
        self.decode_text = decode_text
        self.adapter_cache = adapter_cache
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_context = max_context
        self.batch_wait = batch_wait
        self.batch_quiet = batch_quiet
        self.task_budget = task_budget
        self.prefix = prefix_cache
        self.prefix_keyed_from = 0 if prefix_keyed_by_adapter else None
        self._task_credit = 0.0  # seconds of background work the next iterations may still run while serving
        self._waiting: deque[GenerationRequest] = deque()
        self._prefilling: list[_Sequence] = []  # admitted, KV slot held, prompt not yet fully computed
        self._running: list[_Sequence] = []  # decoding
        self.sampler = Sampler(max_batch_size, int(runner.model.config.vocab_size), runner.device)
        self._free_rows = list(range(max_batch_size - 1, -1, -1))  # popped from the end: row 0 first
        self.grammars = GrammarRows(int(runner.model.config.vocab_size), sorted(self.eos_token_ids))
        self._tasks: deque[BackgroundTask] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._died: str | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.steps = 0
        self.prefills = 0
        self.prefill_positions = 0
        self.intervened_positions = 0

    # ---- called from other threads -------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (or before it starts): readiness reports it."""
        return self._thread is not None and self._thread.is_alive() and self._died is None

    def kv_usage(self) -> float:
        """Fraction of the pool that rows hold: cached prefix blocks are free space, evicted on demand."""
        cached = self.prefix.tokens if self.prefix is not None else 0
        return (self.cache.used_tokens - cached) / self.cache.capacity

    def running_adapters(self) -> list[str]:
        seqs = list(self._running) + list(self._prefilling)
        return sorted({s.request.adapter.name for s in seqs if s.request.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({r.adapter.name for r in list(self._waiting) if r.adapter})

    def reservation(self, prompt_length: int, max_new_tokens: int) -> int:
        """KV columns a request holds while it runs: its prompt plus every token it may generate."""
        return min(prompt_length + max_new_tokens, self.max_context)

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse what can never run, with the numbers, before it takes a queue slot."""
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
        need = self.cache.slot_size(self.reservation(prompt_length, max_new_tokens))
        if need > self.cache.capacity:
            raise PromptTooLong(
                f"the prompt has {prompt_length} tokens and max_tokens is {max_new_tokens}: that needs {need} tokens "
                f"of KV cache ({need * self.cache.bytes_per_token} bytes) and this server's KV cache holds "
                f"{self.cache.capacity} tokens ({self.cache.nbytes} bytes, REFT_KV_CACHE_BYTES)"
            )

    def submit(self, request: GenerationRequest) -> None:
        self.check(len(request.prompt_ids), request.params.max_new_tokens)
        try:
            self.sampler.check(request.params)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        if request.grammar is not None and request.params.ignore_eos:
            raise EngineError("ignore_eos cannot be combined with a structured output: the grammar ends at EOS")
        with self._cv:
            if self._stopping or self._died is not None:
                reason = f"the engine stopped: {self._died}" if self._died else "the engine is shutting down"
                raise EngineStopped(reason)
            free_slots = self.max_batch_size - self.num_running
            if len(self._waiting) >= self.max_queue + max(free_slots, 0):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            request.request_id = request.request_id or f"req-{next(self._ids)}"
            self._waiting.append(request)
            self._cv.notify()

    def add_task(self, task: BackgroundTask) -> None:
        with self._cv:
            if self._stopping or self._died is not None:
                raise EngineStopped("the engine is not running")
            self._tasks.append(task)
            self._cv.notify()

    def start(self) -> None:
        """Start the engine thread; return once it has warmed the runner up and can serve."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="reft-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._died is not None:
            raise RuntimeError(f"the engine could not start: {self._died}")

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:
            # Here, not where the runner was built: the compiled step's CUDA graphs live in per-thread state, so
            # the thread that will replay them is the one that must record them.
            self.runner.warm_up()
            ready.set()
            self._loop()
            message = "the engine stopped"
        except BaseException as exc:  # noqa: BLE001 - the thread is dying: nobody may be left waiting
            log.exception("the engine thread died")
            self._died = f"{type(exc).__name__}: {exc}"
            message = f"the engine stopped: {self._died}"
        ready.set()  # a warm-up that failed must not leave start() waiting
        stopped = Event("", (), "error", error=message, error_status=503)
        with self._cv:
            for seq in self._running + self._prefilling:
                self._emit(seq, stopped)
                self._release(seq)
            for request in self._waiting:
                self._notify(request, stopped)
            for task in self._tasks:
                task.fail(message)
            self._running, self._prefilling = [], []
            self._waiting.clear()
            self._tasks.clear()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._running or self._tasks or self._stopping):
                    self._cv.wait()
                if not self._running and not self._prefilling:
                    self._gather_burst()
                if self._stopping:
                    return
                self._drop_cancelled_waiting()
                admitted = self._admit()
            self._start(admitted)
            self._retire_cancelled()
            if self._prefilling:
                self._prefill()
            if self._running:
                self._decode()
            if self._tasks:
                self._background_step()

    def _background_step(self) -> None:
        """One step of the first background task, asked to last `task_budget` seconds; tasks take turns.

        A step can outlast its budget (a task's smallest piece of work, one long training example,
        may take longer, or its estimate of its own speed may be off). While requests are being
        served, what a step overran is paid back by the next iterations, which run no task until
        the credit (a budget per iteration, never more than one saved up) is positive again: over
        any stretch, background work takes about `task_budget` per iteration, and most token gaps
        hold none of an overlong step. An engine with nothing to serve runs tasks back to back.
        """
        serving = bool(self._running or self._prefilling or self._waiting)
        if serving:
            self._task_credit = min(self._task_credit + self.task_budget, self.task_budget)
            if self._task_credit <= 0:
                return
        task = self._tasks[0]
        started = time.perf_counter()
        try:
            finished = task.step(self.task_budget)
        except Exception as exc:  # noqa: BLE001 - the task's failure is its own
            log.exception("a background task failed")
            task.fail(f"{type(exc).__name__}: {exc}")
            finished = True
        if serving:
            self._task_credit -= time.perf_counter() - started
        with self._cv:
            self._tasks.popleft()
            if not finished:
                self._tasks.append(task)

    def _gather_burst(self) -> None:
        """Let a burst finish arriving at an idle engine, so that it is prefilled as one batch.

        Requests sent together reach the engine a few milliseconds apart; prefilling the first
        alone costs an extra forward pass. So an idle engine waits while requests keep coming
        less than `batch_quiet` seconds apart, at most `batch_wait` seconds after the first, and
        never once the waiting requests fill a batch or the prefill token budget. A lone request
        waits `batch_quiet`. Called with the lock held; waiting releases it.
        """
        if self.batch_wait <= 0 or not self._waiting:
            return
        deadline = self._waiting[0].arrival + self.batch_wait
        while not self._stopping and 0 < len(self._waiting) < self.max_batch_size:
            if sum(len(r.prompt_ids) for r in self._waiting) >= self.max_prefill_tokens:
                return
            until = min(deadline, self._waiting[-1].arrival + self.batch_quiet)
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cv.wait(remaining)

    def _admit(self) -> list[tuple[GenerationRequest, Slot, Acting | None, list[bytes]]]:
        """Take waiting requests in arrival order while the batch has room and their KV slot is free."""
        admitted: list[tuple[GenerationRequest, Slot, Acting | None, list[bytes]]] = []
        while self._waiting and self.num_running + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                self._notify(request, Event("", (), "cancelled", len(request.prompt_ids)))
                continue
            acts, keys = self._prompt_keys(request)
            try:
                slot = self._allocate(self.reservation(len(request.prompt_ids), request.params.max_new_tokens),
                                      keep=frozenset(keys), last_resort=True)
            except CacheFull:
                break  # it waits, first in line, until running rows give their slots back
            admitted.append((self._waiting.popleft(), slot, acts, keys))
        return admitted

    def _prompt_keys(self, request: GenerationRequest) -> tuple[Acting | None, list[bytes]]:
        """How the prefix cache knows this request's interventions, and the keys of its prompt's full blocks."""
        if self.prefix is None:
            return None, []
        ref = request.adapter
        acts = None
        if ref is not None:
            acts = acting(f"{ref.name}@{ref.version}:{ref.sha256}", ref.adapter.locations(len(request.prompt_ids)))
        keys = list(block_keys(request.prompt_ids, self.prefix.block_tokens, acts, keyed_from=self.prefix_keyed_from))
        return acts, keys

    def _allocate(self, tokens: int, keep: frozenset[bytes], last_resort: bool) -> Slot:
        """A KV slot for `tokens`, evicting cached prefix blocks, least recently used first, while none is free.

        Blocks in `keep` (the ones the caller is about to reuse or store after) go last, and only
        when `last_resort`: so the prefix cache never refuses or delays an admission that would
        succeed without it, and storing never evicts what it stores beside.
        """
        while True:
            try:
                return self.cache.allocate(tokens)
            except CacheFull:
                place = self.prefix.evict(keep) if self.prefix is not None else None
                if place is None and last_resort and self.prefix is not None:
                    place = self.prefix.evict(frozenset())
                if place is None:
                    raise
                self.cache.free(place)

    def _reuse(self, seq: _Sequence) -> None:
        """Copy the longest cached prefix of the row's prompt into its slot; its prefill starts after it."""
        if self.prefix is None:
            return
        size = self.prefix.block_tokens
        # The prompt's last token is always computed (its logits are sampled); an echo needs every position's logits.
        usable = [] if seq.request.params.prompt_logprobs is not None else seq.keys[: (len(seq.prompt) - 1) // size]
        found = self.prefix.match(usable)
        self.prefix.count(len(seq.prompt), len(found) * size)
        if found:
            self.cache.copy([(place.start, seq.slot.start + i * size) for i, place in enumerate(found)], size)
            self.cache.writing(seq.slot, len(found) * size)
        seq.computed = seq.cached = len(found) * size
        seq.stored = len(found)

    def _store(self, seq: _Sequence, keys: list[bytes]) -> None:
        """Copy the row's full blocks that the prefix cache lacks out of its slot into blocks of their own."""
        assert self.prefix is not None
        size = self.prefix.block_tokens
        keep = frozenset(keys)
        pairs: list[tuple[int, int]] = []
        for index in range(seq.stored, len(keys)):
            if keys[index] not in self.prefix:
                try:
                    place = self._allocate(size, keep=keep, last_resort=False)
                except CacheFull:
                    break  # a chain is only found from its start: the blocks after a missing one would never match
                self.cache.writing(place, size)
                self.prefix.insert(keys[index], place)
                pairs.append((seq.slot.start + index * size, place.start))
            seq.stored = index + 1
        self.cache.copy(pairs, size)
        self.prefix.match(keys[: seq.stored])

    def _sequence_keys(self, seq: _Sequence) -> list[bytes]:
        """Keys of the row's full blocks whose KV is written: its prompt and every generated token fed back."""
        assert self.prefix is not None
        if seq.computed < len(seq.prompt):
            return seq.keys[: seq.computed // self.prefix.block_tokens]
        tokens = seq.prompt + seq.token_ids[:-1]  # the last sampled token was never fed: its KV does not exist
        more = block_keys(tokens, self.prefix.block_tokens, seq.acts, start=len(seq.keys),
                          parent=seq.keys[-1] if seq.keys else b"", keyed_from=self.prefix_keyed_from)
        return seq.keys + list(more)

    def _start(self, admitted: list[tuple[GenerationRequest, Slot, Acting | None, list[bytes]]]) -> None:
        """Make the admitted requests' adapters resident; one that cannot be loaded fails alone."""
        for request, slot, acts, keys in admitted:
            seq = _Sequence(request, TextTracker(self.decode_text, request.params.stop), slot, self._free_rows.pop(),
                            acts=acts, keys=keys)
            self.sampler.add(seq.row, request.params, request.prompt_ids)
            if request.grammar is not None:
                self.grammars.add(seq.row, request.grammar)
            try:
                seq.resident = self.adapter_cache.get(request.adapter) if request.adapter else None
            except Exception as exc:  # noqa: BLE001 - the adapter's failure is its request's alone
                log.exception("loading adapter %s failed", request.adapter.name if request.adapter else None)
                self._fail(seq, f"the adapter could not be loaded: {exc}")
                continue
            self._reuse(seq)
            self._prefilling.append(seq)

    def _prefill(self) -> None:
        """One prefill step: the next chunk of each admitted prompt, in arrival order, within the token budget."""
        budget = self.prefill_chunk_tokens if self._running else self.max_prefill_tokens
        work: list[tuple[_Sequence, PrefillChunk]] = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.computed)
            chunk = PrefillChunk(seq.prompt[seq.computed : seq.computed + n], seq.computed, len(seq.prompt), seq.slot,
                                 seq.resident, seq.request.params.prompt_logprobs is not None)
            work.append((seq, chunk))
            budget -= n
        started = time.perf_counter()
        self.prefills += 1
        self._isolated(work, self._prefill_part)
        if self.prefix is not None:  # prompts completed here: later requests may share them while these rows decode
            for seq, chunk in work:
                if chunk.completes_prompt and seq.finish_reason is None:
                    self._store(seq, seq.keys)
        log.debug("prefill: %d chunks, %d running, %.0f ms", len(work), len(self._running),
                  1000 * (time.perf_counter() - started))
        self._retire()

    def _prefill_part(self, part: list[tuple[_Sequence, PrefillChunk]]) -> None:
        result = self.runner.prefill([chunk for _, chunk in part])
        echoed = [self._prompt_logprobs(seq, chunk, logits)
                  for (seq, chunk), logits in zip(part, result.prompt_logits, strict=True)]
        done = [seq for seq, chunk in part if chunk.completes_prompt]
        # A row that asked for no new tokens (echo with max_tokens 0) ends with its prompt: nothing is sampled.
        wanted = [i for i, seq in enumerate(done) if seq.request.params.max_new_tokens > 0]
        generating = [done[i] for i in wanted]
        logits = result.logits if len(wanted) == len(done) else result.logits[wanted]
        sampled = self._sample(logits, generating)
        self.intervened_positions += result.intervened
        self.prefill_positions += sum(len(chunk.tokens) for _, chunk in part)
        for (seq, chunk), logprobs in zip(part, echoed, strict=True):
            seq.computed += len(chunk.tokens)
            seq.prompt_logprobs.extend(logprobs)
        for seq in done:
            self._prefilling.remove(seq)
            self._running.append(seq)
            if seq.request.params.max_new_tokens == 0:
                seq.finish_reason = "length"
                self._emit(seq, Event("", (), "length", len(seq.prompt), 0, cached_tokens=seq.cached,
                                      prompt_logprobs=tuple(seq.prompt_logprobs)))
        for seq, token, logprobs in zip(generating, sampled.token_ids, sampled.logprobs, strict=True):
            self._advance(seq, token, logprobs)

    def _prompt_logprobs(self, seq: _Sequence, chunk: PrefillChunk, logits: torch.Tensor | None) -> list[TokenLogprobs]:
        """The logprobs of the prompt tokens this chunk's positions predict (its next ones), when asked for."""
        top = seq.request.params.prompt_logprobs
        if logits is None or top is None or not len(logits):
            return []
        first = chunk.start + 1
        targets = torch.tensor(seq.prompt[first : first + len(logits)], dtype=torch.long, device=logits.device)
        return prompt_logprobs(logits, targets, top)

    def _decode(self) -> None:
        work = [(seq, DecodeRow(seq.token_ids[-1], len(seq.prompt) + len(seq.token_ids) - 1, seq.slot))
                for seq in self._running]
        self.steps += 1
        self._isolated(work, self._decode_part)
        self._retire()

    def _decode_part(self, part: list[tuple[_Sequence, DecodeRow]]) -> None:
        logits = self.runner.decode([row for _, row in part])
        seqs = [seq for seq, _ in part]
        sampled = self._sample(logits, seqs)
        for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            self._advance(seq, token, logprobs)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> SampleOutput:
        if not seqs:
            return SampleOutput([], [])
        rows = [s.row for s in seqs]
        mask = self.grammars.mask(rows, logits.device)
        return self.sampler(logits, torch.tensor(rows, dtype=torch.long, device=logits.device), mask)

    def _isolated(self, work: list[tuple[_Sequence, T]], run: Callable[[list[tuple[_Sequence, T]]], None]) -> None:
        """Run `work` as one step; if that raises, run it row by row and fail only the rows that raise alone.

        Rerunning rows is safe: a step writes each row's KV columns at fixed places, so the retry
        overwrites what the failed attempt wrote with the same values, and no other row's columns
        are touched. `run` changes no row's state before its forward and sampling have succeeded.
        """
        try:
            run(work)
            return
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(work) == 1:
                log.exception("request %s failed", work[0][0].request.request_id)
                self._fail(work[0][0], f"{type(exc).__name__}: {exc}")
                return
            log.exception("a step of %d rows failed; retrying them one by one", len(work))
        for item in work:
            try:
                run([item])
            except Exception as exc:  # noqa: BLE001 - this row's own failure
                log.exception("request %s failed", item[0].request.request_id)
                self._fail(item[0], f"{type(exc).__name__}: {exc}")

    def _advance(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        params = seq.request.params
        if not self.grammars.accept(seq.row, token):
            self._fail(seq, f"token {token} does not continue the structured output")
            return
        seq.token_ids.append(token)
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        if is_stop_token:
            delta, _ = seq.tracker.add(None)
            seq.finish_reason = "stop"
        else:
            delta, hit = seq.tracker.add(token)
            if hit:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= params.max_new_tokens or (
                len(seq.prompt) + len(seq.token_ids) >= self.max_context
            ):
                delta += seq.tracker.add(None)[0]
                seq.finish_reason = "length"
        echoed = tuple(seq.prompt_logprobs) if params.prompt_logprobs is not None and len(seq.token_ids) == 1 else None
        self._emit(seq, Event(delta, (token,), seq.finish_reason, len(seq.prompt), len(seq.token_ids), seq.cached,
                              logprobs=(logprobs,) if logprobs is not None else (), prompt_logprobs=echoed))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        self._notify(seq.request, event)

    def _notify(self, request: GenerationRequest, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the batch
            log.exception("event consumer failed; cancelling %s", request.request_id)
            request.cancelled = True

    def _fail(self, seq: _Sequence, message: str) -> None:
        """Finish one request with an error; its slot is given back at the next retirement."""
        seq.finish_reason = "error"
        self._emit(seq, Event("", (), "error", len(seq.prompt), len(seq.token_ids), error=message))
        if seq not in self._running and seq not in self._prefilling:
            self._release(seq)
        else:
            self._retire()

    def _release(self, seq: _Sequence, keep: bool = False) -> None:
        """Give a leaving row's KV slot and Sampler row back; with `keep`, its full blocks go to the prefix cache."""
        if keep and self.prefix is not None:
            self._store(seq, self._sequence_keys(seq))
        self.cache.free(seq.slot)
        self.sampler.remove(seq.row)
        self.grammars.remove(seq.row)
        self._free_rows.append(seq.row)

    def _drop_cancelled_waiting(self) -> None:
        """Answer and forget queued requests that were cancelled, wherever they sit in the queue."""
        if not any(r.cancelled for r in self._waiting):
            return
        kept: deque[GenerationRequest] = deque()
        for request in self._waiting:
            if request.cancelled:
                self._notify(request, Event("", (), "cancelled", len(request.prompt_ids)))
            else:
                kept.append(request)
        self._waiting = kept

    def _retire_cancelled(self) -> None:
        for seq in self._running + self._prefilling:
            if seq.request.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self._emit(seq, Event("", (), "cancelled", len(seq.prompt), len(seq.token_ids)))
        self._retire()

    def _retire(self) -> None:
        """Drop finished rows and give their KV slots back; no other row's cache is touched."""
        for rows in (self._running, self._prefilling):
            finished = [s for s in rows if s.finish_reason is not None]
            for seq in finished:
                # Before it leaves the count: an idle engine holds no row's slot, table or grammar.
                self._release(seq, keep=seq.finish_reason != "error")
                rows.remove(seq)
