"""Locust users for reft-serve: inference over many adapters while admins replace, upload and delete them.

Started by load_tests/run.py (`make load`, and the short version in tests/test_load.py), which writes the
plan (load_tests/workload.py) and checks the records afterwards. By hand, against a server of yours:
    python load_tests/run.py --url http://127.0.0.1:8000 ...   (see run.py --help)
Every finished request and adapter write is appended to the plan's records file as one JSON line.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task
from workload import PATHS, Plan, make_request, parse_stream, parse_whole, with_adapter, zipf_weights

PLAN = Plan.load(Path(os.environ["REFT_LOAD_PLAN"]))
WEIGHTS = zipf_weights(len(PLAN.adapters), PLAN.zipf_s)
RECORDS = open(PLAN.records, "a", buffering=1)  # noqa: SIM115 - one line per record, for the process's life
POOL = itertools.count()
REPLACING: set[str] = set()  # one replacement per name at a time, so versions follow acknowledgement order
SEEDS = itertools.count(PLAN.seed * 1_000_003)
_write_lock = threading.Lock()


def record(rec: dict) -> None:
    with _write_lock:
        RECORDS.write(json.dumps(rec) + "\n")


def admin_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {PLAN.admin_key}"} if PLAN.admin_key else {}


class InferenceUser(HttpUser):
    """A closed-loop client: completions, chat and native generation, streaming or not, Zipf over adapters."""

    wait_time = between(0.0, 0.1)
    weight = 1

    def on_start(self) -> None:
        self.rng = random.Random(next(SEEDS))

    @task
    def generate(self) -> None:
        req = make_request(PLAN, self.rng, WEIGHTS)
        endpoint, body = req["endpoint"], with_adapter(req["endpoint"], req["body"], req["adapter"])
        name = f"{PATHS[endpoint]}{' [stream]' if req['stream'] else ''}"
        rec = {"kind": "gen", "id": uuid.uuid4().hex, **req, "t_send": time.time(), "t_first": None, "status": 0}
        try:
            with self.client.post(PATHS[endpoint], json=body, name=name, stream=req["stream"],
                                  catch_response=True) as r:
                rec["status"] = r.status_code
                if r.status_code == 200:
                    if req["stream"]:
                        parse_stream(r.iter_lines(), endpoint, rec)
                        if not rec.get("done") or rec.get("stream_error"):
                            r.failure(f"stream ended badly: {rec.get('stream_error')}")
                    else:
                        parse_whole(r.json(), endpoint, rec)
                elif r.status_code == 429:
                    r.success()  # back-pressure is the designed answer to overload
                else:
                    rec["error"] = r.text[:300]
                    r.failure(f"{r.status_code}: {r.text[:200]}")
        except Exception as exc:  # noqa: BLE001 - a broken connection is a result to record, not a crash
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["t_end"] = time.time()
        record(rec)


class AdminUser(HttpUser):
    """Replaces served adapters with new versions, uploads and deletes scratch adapters."""

    wait_time = between(*PLAN.admin_wait)
    fixed_count = int(os.environ.get("REFT_LOAD_ADMIN_USERS", "2"))

    def on_start(self) -> None:
        self.rng = random.Random(next(SEEDS))
        self.scratch: list[str] = []

    def upload(self, op: str, name: str, path: str, replace: bool) -> dict:
        rec = {"kind": "admin", "op": op, "name": name, "file": path, "t_start": time.time(), "status": 0}
        data = {"name": name, "replace": "true" if replace else "false"}
        files = {"file": (Path(path).name, Path(path).read_bytes(), "application/octet-stream")}
        return self.admin_call(rec, 201, lambda: self.client.post(
            "/v1/adapters", data=data, files=files, headers=admin_headers(), name=f"/v1/adapters [{op}]",
            catch_response=True))

    def admin_call(self, rec: dict, expected: int, send: Callable[[], Any]) -> dict:
        """Send one admin call; record its status (and the new version on 201), any error, and when it was answered."""
        try:
            with send() as r:
                rec["status"] = r.status_code
                if r.status_code != expected:
                    rec["error"] = r.text[:300]
                    r.failure(f"{r.status_code}: {r.text[:200]}")
                elif expected == 201:
                    desc = r.json()
                    rec["version"], rec["sha256"] = desc["version"], desc["sha256"]
        except Exception as exc:  # noqa: BLE001 - recorded and reported by the run, never raised into locust
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["t_ack"] = time.time()
        record(rec)
        return rec

    @task(5)
    def replace(self) -> None:
        free = [n for n in PLAN.adapters if n not in REPLACING]
        index = next(POOL)
        if not free or index >= len(PLAN.pool):
            return
        name = self.rng.choices(free, [WEIGHTS[PLAN.adapters.index(n)] for n in free])[0]
        REPLACING.add(name)
        try:
            self.upload("replace", name, PLAN.pool[index], replace=True)
        finally:
            REPLACING.discard(name)

    @task(3)
    def upload_scratch(self) -> None:
        if PLAN.pool:
            name = f"scratch-{uuid.uuid4().hex[:12]}"
            if self.upload("upload", name, self.rng.choice(PLAN.pool), replace=False)["status"] == 201:
                self.scratch.append(name)

    @task(2)
    def delete_scratch(self) -> None:
        if not self.scratch:
            return
        name = self.scratch.pop(self.rng.randrange(len(self.scratch)))
        rec = {"kind": "admin", "op": "delete", "name": name, "t_start": time.time(), "status": 0}
        self.admin_call(rec, 204, lambda: self.client.delete(
            f"/v1/adapters/{name}", headers=admin_headers(), name="/v1/adapters/{name}", catch_response=True))
