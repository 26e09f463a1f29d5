"""The engine thread: asks the scheduling policy for a plan, runs it on the model, reports back.

One background thread owns the model, the KV cache and the sampler. Each iteration takes a
`StepPlan` from `Scheduler.schedule()` (server/engine/scheduler.py says which rows join, which
prompt chunks are prefilled and which rows decode), runs its prefill step and then its decode
step on the `ModelRunner`, samples every row with the batched `Sampler`, turns the ids into
`Event`s with the `OutputProcessor` and hands each row's outcome to `Scheduler.update()`. A step
that fails is retried row by row, so an error fails only the request it belongs to. Callers
submit from any thread and receive `Event`s through the callback they pass. Background tasks
(training jobs) get a time budget per iteration, after the decode step (`_background_step` says
how it is kept), so a stream's token gap grows by about that budget while a task runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from server.engine import output
from server.engine.kv_cache import Slot
from server.engine.output import Event, OutputProcessor
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SampleOutput, Sampler, TokenLogprobs
from server.engine.scheduler import (
    Chunk,
    EngineError,
    EngineStopped,
    GenerationRequest,
    RowOutput,
    Scheduler,
    Sequence,
    StepPlan,
)
from server.engine.structured import GrammarRows, conflict

log = logging.getLogger(__name__)
T = TypeVar("T")


class BackgroundTask(Protocol):
    """Work that shares the engine thread with serving, one bounded step at a time."""

    def step(self, budget: float) -> bool:
        """Run one step of about `budget` seconds (or its smallest piece of work, if longer); True once finished."""

    def fail(self, message: str) -> None:
        """The task cannot go on (its step raised, or the engine stopped)."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's state and counters at one moment, for /metrics."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # fraction of the KV cache's columns that rows hold
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill steps run
    prefill_positions: int = 0  # prompt positions computed by prefills
    intervened_positions: int = 0  # (row, layer-round, position) pairs intervened on
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found there (KV copied, not computed)
    prefix_blocks: int = 0  # blocks the prefix cache holds


class EngineLoop:
    def __init__(
        self,
        runner: ModelRunner,
        policy: Scheduler,
        decode_text: Callable[[list[int]], str],
        *,
        eos_token_ids: Iterable[int],
        task_budget: float = 0.05,
    ) -> None:
        self.runner = runner
        self.policy = policy
        eos = sorted(set(eos_token_ids))
        self.output = OutputProcessor(decode_text, eos, policy.max_context)
        vocab_size = int(runner.model.config.vocab_size)
        self.sampler = Sampler(policy.max_batch_size, vocab_size, runner.device)
        self.grammars = GrammarRows(vocab_size, eos)
        self.task_budget = task_budget
        self._task_credit = 0.0  # seconds of background work the next iterations may still run while serving
        self._tasks: deque[BackgroundTask] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._died: str | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._steps = 0
        self._prefills = 0
        self._prefill_positions = 0
        self._intervened_positions = 0

    # ---- called from other threads -------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.policy.max_batch_size

    @property
    def max_queue(self) -> int:
        return self.policy.max_queue

    @property
    def max_context(self) -> int:
        return self.policy.max_context

    @property
    def num_waiting(self) -> int:
        return self.policy.num_waiting

    @property
    def room(self) -> int:
        return self.policy.room

    @property
    def num_running(self) -> int:
        return self.policy.num_running

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (or before it starts): readiness reports it."""
        return self._thread is not None and self._thread.is_alive() and self._died is None

    @property
    def prefix(self) -> PrefixCache[Slot] | None:
        return self.policy.prefix

    def stats(self) -> EngineStats:
        prefix = self.policy.prefix
        return EngineStats(
            waiting=self.policy.num_waiting, running=self.policy.num_running, kv_usage=self.policy.kv_usage(),
            steps=self._steps, prefills=self._prefills, prefill_positions=self._prefill_positions,
            intervened_positions=self._intervened_positions,
            running_adapters=tuple(self.policy.running_adapters()),
            waiting_adapters=tuple(self.policy.waiting_adapters()),
            prefix_queried_tokens=prefix.queried_tokens if prefix is not None else 0,
            prefix_hit_tokens=prefix.hit_tokens if prefix is not None else 0,
            prefix_blocks=len(prefix) if prefix is not None else 0,
        )

    def submit(self, request: GenerationRequest) -> None:
        self.policy.check(len(request.prompt_ids), request.params.max_new_tokens)
        try:
            self.sampler.check(request.params)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        why = request.grammar and conflict(request.params)
        if why:
            raise EngineError(why)
        with self._cv:
            if self._stopping or self._died is not None:
                reason = f"the engine stopped: {self._died}" if self._died else "the engine is shutting down"
                raise EngineStopped(reason)
            self.policy.add(request)
            request.request_id = request.request_id or f"req-{next(self._ids)}"
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
        event = output.stopped(message)
        with self._cv:
            # The rows' KV columns go back (a runner may outlive its loop); sampler rows and matchers go with the loop.
            retired, waiting = self.policy.abort()
            for seq in retired:
                self._notify(seq.request, event)
            for request in waiting:
                self._notify(request, event)
            for task in self._tasks:
                task.fail(message)
            self._tasks.clear()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.policy.has_work or self._tasks or self._stopping):
                    self._cv.wait()
                if self.policy.idle:
                    self._gather_burst()
                if self._stopping:
                    return
                plan = self.policy.schedule()
            self._step(plan)
            if self._tasks:
                self._background_step()

    def _gather_burst(self) -> None:
        """Let a burst finish arriving at an idle engine (`Scheduler.burst_wait`); waiting releases the lock."""
        while not self._stopping and (remaining := self.policy.burst_wait(time.monotonic())) > 0:
            self._cv.wait(remaining)

    def _step(self, plan: StepPlan) -> None:
        for request in plan.cancelled:
            self._notify(request, output.cancelled(request))
        for seq, message in plan.failed:
            self._notify(seq.request, output.failed(seq, message))
        for seq in plan.admitted:
            self.sampler.add(seq.row, seq.request.params, seq.prompt)
            if seq.request.grammar is not None:
                self.grammars.add(seq.row, seq.request.grammar)
            self.output.start(seq)
        for seq in plan.retired:
            self._notify(seq.request, output.cancelled(seq.request, len(seq.token_ids)))
        self._release(plan.retired)
        if plan.prefill:
            self._prefill(plan.prefill)
        decoding = [seq for seq in plan.decode if not seq.finished]
        if decoding:
            self._decode(decoding)

    def _background_step(self) -> None:
        """One step of the first background task, asked to last `task_budget` seconds; tasks take turns.

        A step can outlast its budget (a task's smallest piece of work, one long training example,
        may take longer, or its estimate of its own speed may be off). While requests are being
        served, what a step overran is paid back by the next iterations, which run no task until
        the credit (a budget per iteration, never more than one saved up) is positive again: over
        any stretch, background work takes about `task_budget` per iteration, and most token gaps
        hold none of an overlong step. An engine with nothing to serve runs tasks back to back.
        """
        serving = self.policy.has_work
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

    def _prefill(self, chunks: Iterable[Chunk]) -> None:
        work = [(c.seq, PrefillChunk(c.tokens, c.start, len(c.seq.prompt), c.seq.slot, c.seq.resident,
                                     c.seq.request.params.prompt_logprobs is not None))
                for c in chunks]
        started = time.perf_counter()
        self._prefills += 1
        self._isolated(work, self._prefill_part)
        log.debug("prefill: %d chunks, %d running, %.0f ms", len(work), len(self.policy.running),
                  1000 * (time.perf_counter() - started))

    def _prefill_part(self, part: list[tuple[Sequence, PrefillChunk]]) -> None:
        result = self.runner.prefill([chunk for _, chunk in part])
        echoed = [self.output.prompt_logprobs(seq, chunk, logits)
                  for (seq, chunk), logits in zip(part, result.prompt_logits, strict=True)]
        done = [seq for seq, chunk in part if chunk.completes_prompt]
        # A row that asked for no new tokens (echo with max_tokens 0) ends with its prompt: nothing is sampled.
        wanted = [i for i, seq in enumerate(done) if seq.request.params.max_new_tokens > 0]
        generating = [done[i] for i in wanted]
        logits = result.logits if len(wanted) == len(done) else result.logits[wanted]
        sampled = self._sample(logits, generating)
        self._intervened_positions += result.intervened
        self._prefill_positions += sum(len(chunk.tokens) for _, chunk in part)
        for (seq, _), logprobs in zip(part, echoed, strict=True):
            self.output.echo(seq, logprobs)
        tokens = {seq: (token, logprobs)
                  for seq, token, logprobs in zip(generating, sampled.token_ids, sampled.logprobs, strict=True)}
        outputs = []
        for seq, chunk in part:
            computed = len(chunk.tokens)
            if not chunk.completes_prompt:
                outputs.append(RowOutput(seq, computed))
            elif seq.request.params.max_new_tokens == 0:
                self._notify(seq.request, self.output.prompt_only(seq))
                outputs.append(RowOutput(seq, computed, finish_reason="length"))
            elif (event := self._advance(seq, *tokens[seq])) is not None:
                outputs.append(RowOutput(seq, computed, event.token_ids[0], event.finish_reason))
        self._release(self.policy.update(outputs))

    def _decode(self, seqs: list[Sequence]) -> None:
        work = [(seq, DecodeRow(seq.token_ids[-1], len(seq.prompt) + len(seq.token_ids) - 1, seq.slot))
                for seq in seqs]
        self._steps += 1
        self._isolated(work, self._decode_part)

    def _decode_part(self, part: list[tuple[Sequence, DecodeRow]]) -> None:
        logits = self.runner.decode([row for _, row in part])
        seqs = [seq for seq, _ in part]
        sampled = self._sample(logits, seqs)
        outputs = []
        for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            if (event := self._advance(seq, token, logprobs)) is not None:
                outputs.append(RowOutput(seq, token=token, finish_reason=event.finish_reason))
        self._release(self.policy.update(outputs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        if not seqs:
            return SampleOutput([], [])
        rows = [s.row for s in seqs]
        mask = self.grammars.mask(rows, logits.device)
        return self.sampler(logits, torch.tensor(rows, dtype=torch.long, device=logits.device), mask)

    def _isolated(self, work: list[tuple[Sequence, T]], run: Callable[[list[tuple[Sequence, T]]], None]) -> None:
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

    def _advance(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> Event | None:
        """Send the event of a row's sampled token; None when the token breaks its grammar (the row failed)."""
        if not self.grammars.accept(seq.row, token):
            self._fail(seq, f"token {token} does not continue the structured output")
            return None
        event = self.output.token(seq, token, logprobs)
        self._notify(seq.request, event)
        return event

    def _notify(self, request: GenerationRequest, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the batch
            log.exception("event consumer failed; cancelling %s", request.request_id)
            request.cancelled = True

    def _fail(self, seq: Sequence, message: str) -> None:
        """Finish one request with an error and retire it."""
        self._notify(seq.request, output.failed(seq, message))
        self._release(self.policy.finish(seq, "error"))

    def _release(self, seqs: Iterable[Sequence]) -> None:
        """Free the retired rows' sampler rows, grammar matchers and text state (the policy freed their KV)."""
        for seq in seqs:
            self.sampler.remove(seq.row)
            self.grammars.remove(seq.row)
            self.output.remove(seq)
