"""Training jobs over HTTP: pyreft's recipe on the serving process's own base model.

A job is a `Trainer` run as a background task of the scheduler: the engine thread runs one
optimisation step of it after each decode step, so serving is never held up for longer than one
training step, and a training forward never runs beside an engine forward. When the last step
is done the adapter is registered through the same validation as an upload. Jobs live in memory
only: a restart forgets them (adapters they finished are in the registry).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server import adapter_file
from server.engine.scheduler import Scheduler
from server.model import BaseModel
from server.registry import Registry
from server.train import TrainConfig, Trainer, encode, records_from_rows

MAX_JOBS = 100  # finished jobs beyond this are forgotten, oldest first


class JobError(ValueError):
    """A job that cannot be started (bad data or settings); the message says why."""


@dataclass
class TrainingJob:
    id: str
    name: str
    replace: bool
    trainer: Trainer = field(repr=False)
    registry: Registry = field(repr=False)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    loss: float | None = None
    error: str | None = None
    adapter: dict | None = None  # the registered adapter's description, once succeeded
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def step(self) -> bool:
        """One optimisation step (runs on the engine thread); registers the adapter after the last."""
        if self.cancel_requested:
            self._finish("cancelled")
            return True
        self.status = "running"
        self.loss = self.trainer.step()
        if not self.trainer.done:
            return False
        data = adapter_file.to_bytes(self.trainer.adapter())
        record = self.registry.put(self.name, self.registry.parse_upload(data, None, False), self.replace)
        self.adapter = record.describe()
        self._finish("succeeded")
        return True

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


class TrainingJobs:
    """The jobs of this process, by id."""

    def __init__(self, base: BaseModel, registry: Registry, scheduler: Scheduler) -> None:
        self.base, self.registry, self.scheduler = base, registry, scheduler
        self._jobs: OrderedDict[str, TrainingJob] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, name: str, rows: list[object], config: TrainConfig, replace: bool) -> TrainingJob:
        """Check and tokenize the data, build the trainer, queue the job (call from a worker thread)."""
        if self.base.dtype != torch.float32:
            raise JobError(f"training over HTTP needs a float32 base model (this one is {self.base.dtype}); "
                           "use `reft-serve train` and upload the result")
        try:
            trainer = Trainer(self.base, encode(records_from_rows(rows), self.base), config)
        except ValueError as exc:  # DataError included
            raise JobError(str(exc)) from None
        job = TrainingJob(f"train-{next(self._ids)}", name, replace, trainer, self.registry)
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.done]
            for old in finished[: max(0, len(self._jobs) - MAX_JOBS)]:
                del self._jobs[old.id]
        self.scheduler.add_task(job)
        return job

    def get(self, job_id: str) -> TrainingJob | None:
        return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> TrainingJob | None:
        """Ask a job to stop; it does before its next step (a finished job is left as it is)."""
        job = self._jobs.get(job_id)
        if job is not None and not job.done:
            job.cancel_requested = True
        return job
