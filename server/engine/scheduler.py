"""The continuous-batching loop: admit, prefill, decode, retire, cancel.

It runs in one background thread that owns the model. Each iteration admits waiting requests
(up to the batch size and the prefill token budget), prefills them as one batch with their
interventions, merges them into the running batch, then runs one decode step for every
running row. Finished and cancelled rows leave the batch before the next step. Callers
submit from any thread and receive `Event`s through the callback they pass.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.runner import KVBatch, ModelRunner
from server.engine.sampling import SamplingParams, TextTracker, make_generator, sample

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


@dataclass(frozen=True)
class Event:
    """What one engine step produced for one request."""

    text: str  # new text, safe to show (never part of a stop string or of a UTF-8 character)
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    on_event: Callable[[Event], None]
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed before the next decode step."""
        self.cancelled = True


@dataclass
class _Sequence:
    request: GenerationRequest
    tracker: TextTracker
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


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
        batch_wait: float = 0.0,
        batch_quiet: float = 0.0,
    ) -> None:
        self.runner = runner
        self.decode_text = decode_text
        self.adapter_cache = adapter_cache
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_context = max_context
        self.batch_wait = batch_wait
        self.batch_quiet = batch_quiet
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Sequence] = []
        self._admitting = 0  # popped from the queue, not yet in the running batch (being prefilled)
        self._kv: KVBatch | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.steps = 0
        self.prefills = 0
        self.intervened_positions = 0

    # ---- called from other threads -------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the engine thread runs: readiness turns 503 once it has died or stopped."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + self._admitting

    def running_adapters(self) -> list[str]:
        return sorted({s.request.adapter.name for s in list(self._running) if s.request.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({r.adapter.name for r in list(self._waiting) if r.adapter})

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

    def submit(self, request: GenerationRequest) -> None:
        self.check(len(request.prompt_ids), request.params.max_new_tokens)
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            free_slots = self.max_batch_size - len(self._running) - self._admitting
            if len(self._waiting) >= self.max_queue + max(free_slots, 0):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            request.request_id = request.request_id or f"req-{next(self._ids)}"
            self._waiting.append(request)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reft-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._stopping:
                    self._cv.wait()
                if not self._running:
                    self._gather_burst()
                if self._stopping:
                    break
                self._drop_cancelled_waiting()
                admitted = self._admit()
                self._admitting = len(admitted)
            try:
                self._retire_cancelled()
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - a failed step must fail its requests, not the server
                log.exception("engine step failed")
                self._fail_all(admitted, exc)
        self._fail_all([], EngineStopped("the engine stopped"))
        with self._cv:
            for request in self._waiting:
                self._notify(request, Event("", (), "error", error="the engine stopped"))
            self._waiting.clear()

    def _gather_burst(self) -> None:
        """Let a burst finish arriving at an idle engine, so that it is prefilled as one batch.

        Requests sent together reach the engine a few milliseconds apart; prefilling the first
        alone and merging the rest later costs an extra forward pass and a KV merge. So an idle
        engine waits while requests keep coming less than `batch_quiet` seconds apart, at most
        `batch_wait` seconds after the first, and never once the waiting requests fill a batch or
        the prefill token budget. A lone request waits `batch_quiet`. Called with the lock held;
        waiting releases it.
        """
        if self.batch_wait <= 0 or not self._waiting:
            return
        deadline = self._waiting[0].arrival + self.batch_wait
        while not self._stopping and 0 < len(self._waiting) < self.max_batch_size:
            longest = max(len(r.prompt_ids) for r in self._waiting)
            if longest * len(self._waiting) >= self.max_prefill_tokens:
                return
            until = min(deadline, self._waiting[-1].arrival + self.batch_quiet)
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cv.wait(remaining)

    def _admit(self) -> list[GenerationRequest]:
        admitted: list[GenerationRequest] = []
        longest = 0
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                self._notify(request, Event("", (), "cancelled", len(request.prompt_ids)))
                continue
            width = max(longest, len(request.prompt_ids))
            if admitted and width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            longest = width
            admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, admitted: list[GenerationRequest]) -> None:
        started = time.perf_counter()
        resident = [self.adapter_cache.get(r.adapter) if r.adapter else None for r in admitted]
        logits, kv, pairs = self.runner.prefill([r.prompt_ids for r in admitted], resident)
        log.debug("prefill: %d rows joining %d running, %.0f ms", len(admitted), len(self._running),
                  1000 * (time.perf_counter() - started))
        self.intervened_positions += pairs
        self.prefills += 1
        sequences = [
            _Sequence(r, TextTracker(self.decode_text, r.params.stop), make_generator(r.params)) for r in admitted
        ]
        tokens = sample(logits, [r.params for r in admitted], [s.generator for s in sequences])
        if self._kv is None:
            self._kv = kv
        else:
            self._kv.extend(kv)
        self._running.extend(sequences)
        self._admitting = 0
        for seq, token in zip(sequences, tokens.tolist(), strict=True):
            self._advance(seq, token)
        self._retire()

    def _decode(self) -> None:
        assert self._kv is not None
        last = torch.tensor([s.token_ids[-1] for s in self._running], dtype=torch.long)
        logits = self.runner.decode(self._kv, last)
        self.steps += 1
        tokens = sample(logits, [s.request.params for s in self._running], [s.generator for s in self._running])
        for seq, token in zip(self._running, tokens.tolist(), strict=True):
            self._advance(seq, token)
        self._retire()

    def _advance(self, seq: _Sequence, token: int) -> None:
        params = seq.request.params
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
                len(seq.request.prompt_ids) + len(seq.token_ids) >= self.max_context
            ):
                delta += seq.tracker.add(None)[0]
                seq.finish_reason = "length"
        self._emit(seq, Event(delta, (token,), seq.finish_reason, len(seq.request.prompt_ids), len(seq.token_ids)))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        self._notify(seq.request, event)

    def _notify(self, request: GenerationRequest, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the batch
            log.exception("event consumer failed; cancelling %s", request.request_id)
            request.cancelled = True

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
        for seq in self._running:
            if seq.request.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self._emit(seq, Event("", (), "cancelled", len(seq.request.prompt_ids), len(seq.token_ids)))
        self._retire()

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._kv = None
        elif self._kv is not None:
            self._kv.select(keep)

    def _fail_all(self, admitted: list[GenerationRequest], exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        failed = {id(s.request) for s in self._running}
        for seq in self._running:
            self._emit(seq, Event("", (), "error", error=message))
        for request in admitted:
            if id(request) not in failed:
                self._notify(request, Event("", (), "error", error=message))
        self._running = []
        self._admitting = 0
        self._kv = None
