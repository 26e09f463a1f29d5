"""Training jobs over HTTP: pyreft's recipe on the serving process's own base model.

A job is a `Trainer` run as a background task of the engine loop: the engine thread gives it a
time budget after each decode step, and the job spends it on one micro-step (gradient
accumulation over as many examples of the batch as its measured speed fits in the budget), so an
optimisation step of any batch size is spread over many engine iterations, and a training
forward never runs beside an engine forward. When the last step is done the adapter is
registered, through the same validation as an upload, in a thread of its own: the registry's
cross-process lock and fsync never hold the engine thread. If the name was uploaded or deleted
(through any replica) while the job trained, nothing is overwritten: the job ends as `conflict`
and keeps its adapter for download. Jobs live in memory only: a restart forgets them (adapters
they registered are in the registry).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server import adapter_file
from server.engine.loop import EngineLoop
from server.model import BaseModel
from server.registry import AdapterChanged, AdapterRecord, Registry
from server.train import TrainConfig, Trainer, encode, records_from_rows, step_tokens, total_steps

MAX_JOBS = 100  # finished jobs beyond this are forgotten, oldest first


class JobError(ValueError):
    """A job that cannot be started (bad data or settings, or too costly); `status` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JobLimits:
    """What one job may cost, checked before it starts (REFT_MAX_TRAIN_*)."""

    max_jobs: int  # queued or running at once
    max_steps: int  # optimisation steps: epochs x batches per epoch
    max_step_tokens: int  # prompt + completion tokens of the largest batch


@dataclass
class TrainingJob:
    id: str
    name: str
    replace: bool
    trainer: Trainer = field(repr=False)
    registry: Registry = field(repr=False)
    seen: AdapterRecord | None = field(repr=False)  # the name's record when the job started (None: free)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled | conflict
    loss: float | None = None
    error: str | None = None
    adapter: dict | None = None  # the registered adapter's description, once succeeded
    result: bytes | None = field(default=None, repr=False)  # the trained adapter's file, once built
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: bool = False
    _seconds_per_token: float | None = field(default=None, repr=False)  # the last micro-step's speed

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled", "conflict")

    def step(self, budget: float) -> bool:
        """One micro-step sized to take about `budget` seconds (runs on the engine thread); True once training
        is over. The first micro-step takes one example; each later one as many as the last one's speed fits."""
        if self.cancel_requested:
            self._finish("cancelled")
            return True
        self.status = "running"
        rate = self._seconds_per_token
        started = time.perf_counter()
        micro = self.trainer.accumulate(max(1, int(budget / rate)) if rate else 1)
        self._seconds_per_token = (time.perf_counter() - started) / micro.tokens
        if micro.loss is not None:
            self.loss = micro.loss
        if not self.trainer.done:
            return False
        threading.Thread(target=self._register, name=f"reft-{self.id}-register", daemon=True).start()
        return True

    def _register(self) -> None:
        """Save and register the trained adapter unless its name changed meanwhile (in a thread that then exits:
        torch_threads.py says why)."""
        try:
            self.result = adapter_file.to_bytes(self.trainer.adapter())
            adapter = self.registry.parse_upload(self.result, None, False)
            record = self.registry.put(self.name, adapter, self.replace, expected=self.seen)
        except AdapterChanged as exc:
            self.error = (f"adapter {self.name!r} changed while the job trained ({_version(self.seen, 'absent')} "
                          f"when it started, {_version(exc.current, 'deleted')} now), so it was left as it is; the "
                          f"trained adapter is at GET /v1/adapters/train/{self.id}/adapter, to upload under this or "
                          "another name")
            self._finish("conflict")
        except Exception as exc:  # noqa: BLE001 - the job's own failure, reported in its status
            self.fail(f"the trained adapter could not be registered: {type(exc).__name__}: {exc}")
        else:
            self.adapter = record.describe()
            self._finish("succeeded")

    def fail(self, message: str) -> None:
        self.error = message
        self._finish("failed")

    def _finish(self, status: str) -> None:
        self.status, self.finished = status, time.time()

    def describe(self) -> dict:
        t = self.trainer
        return {
            "id": self.id, "name": self.name, "status": self.status, "epoch": t.epoch, "epochs": t.config.epochs,
            "step": t.steps_done, "steps": t.total_steps, "loss": self.loss, "error": self.error,
            "adapter": self.adapter, "created": self.created, "finished": self.finished,
        }


def _version(record: AdapterRecord | None, missing: str) -> str:
    if record is None:
        return missing
    return f"version {record.version}, sha256 {record.sha256[:12]}"


class TrainingJobs:
    """The jobs of this process, by id."""

    def __init__(self, base: BaseModel, registry: Registry, loop: EngineLoop, limits: JobLimits) -> None:
        self.base, self.registry, self.loop, self.limits = base, registry, loop, limits
        self._jobs: OrderedDict[str, TrainingJob] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, name: str, rows: list[object], config: TrainConfig, replace: bool) -> TrainingJob:
        """Check the job against the limits, tokenize the data, build the trainer, queue the job (call from a worker
        thread). Everything that can be refused is refused here, before any training."""
        if self.base.dtype != torch.float32:
            raise JobError(f"training over HTTP needs a float32 base model (this one is {self.base.dtype}); "
                           "use `reft-serve train` and upload the result")
        self._check_room()
        if config.rank > self.registry.max_rank:
            raise JobError(f"rank {config.rank} exceeds this server's largest intervention rank, "
                           f"{self.registry.max_rank} (REFT_MAX_RANK): the adapter could not be registered")
        limits = self.limits
        if rows and config.epochs >= 1 and config.batch_size >= 1:
            steps = total_steps(len(rows), config)
            if steps > limits.max_steps:
                raise JobError(f"{config.epochs} epochs of {len(rows)} examples in batches of {config.batch_size} "
                               f"are {steps} steps; this server runs at most {limits.max_steps} per job "
                               "(REFT_MAX_TRAIN_STEPS)")
        seen = self.registry.get(name) if name in self.registry else None
        try:
            examples = encode(records_from_rows(rows), self.base)
            tokens = step_tokens(examples, config.batch_size)
            if tokens > limits.max_step_tokens:
                raise JobError(f"the largest batch of {min(config.batch_size, len(examples))} examples holds {tokens} "
                               f"tokens; this server computes at most {limits.max_step_tokens} per optimisation step "
                               "(REFT_MAX_TRAIN_STEP_TOKENS): use a smaller batch_size or shorter examples", 413)
            trainer = Trainer(self.base, examples, config)
        except JobError:
            raise
        except ValueError as exc:  # DataError included
            raise JobError(str(exc)) from None
        job = TrainingJob(f"train-{next(self._ids)}", name, replace, trainer, self.registry, seen)
        with self._lock:
            self._check_room()
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.done]
            for old in finished[: max(0, len(self._jobs) - MAX_JOBS)]:
                del self._jobs[old.id]
        self.loop.add_task(job)
        return job

    def _check_room(self) -> None:
        active = sum(not job.done for job in list(self._jobs.values()))
        if active >= self.limits.max_jobs:
            raise JobError(f"{active} training job{'s' if active != 1 else ''} queued or running; this server runs "
                           f"at most {self.limits.max_jobs} at once (REFT_MAX_TRAIN_JOBS): retry when one has "
                           "finished", 429)

    def get(self, job_id: str) -> TrainingJob | None:
        return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> TrainingJob | None:
        """Ask a job to stop; it does before its next micro-step (a finished job is left as it is)."""
        job = self._jobs.get(job_id)
        if job is not None and not job.done:
            job.cancel_requested = True
        return job
