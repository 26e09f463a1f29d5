"""Training jobs over HTTP on a real server: start, follow, register, cancel, refuse; serving goes on."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import error_of

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-secret"}
EXAMPLES = [
    {"prompt": "Say hi.", "completion": "HI THERE!"},
    {"prompt": "Name a fruit.", "completion": "A BANANA!"},
    {"prompt": "What is 2+2?", "completion": "FOUR!"},
]


EMOJI = (Path(__file__).parents[1] / "adapters" / "emoji.safetensors").read_bytes()
# Small bounds, so that each is reached by a small request: EXAMPLES hold about 20 tokens each.
LIMITS = {"REFT_MAX_TRAIN_STEPS": "60", "REFT_MAX_TRAIN_STEP_TOKENS": "200", "REFT_MAX_TRAIN_JOBS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    tmp = tmp_path_factory.mktemp("train-http")
    return reft_server_factory(tmp / "adapters", tmp / "server.log", env={"REFT_ADMIN_KEY": "admin-secret", **LIMITS})


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def upload(client: httpx.Client, name: str, data: bytes = EMOJI, replace: bool = False) -> httpx.Response:
    form = {"name": name, **({"replace": "true"} if replace else {})}
    return client.post("/v1/adapters", data=form, headers=ADMIN, files={"file": ("a.safetensors", data)})


def wait_done(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/adapters/train/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "conflict"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_a_job_trains_registers_its_adapter_and_serving_goes_on(client):
    body = {"name": "shouty", "data": EXAMPLES, "epochs": 4, "batch_size": 3, "positions": "l2", "layers": [3, 9]}
    streamed: list[str] = []

    def stream() -> None:  # a request served while the job trains
        with client.stream("POST", "/generate", json={"prompt": "Tell me a story.", "max_new_tokens": 24,
                                                      "ignore_eos": True, "stream": True}) as r:
            streamed.extend(line for line in r.iter_lines() if line.startswith("data:"))

    r = client.post("/v1/adapters/train", json=body, headers=ADMIN)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["steps"] == 4 and job["epochs"] == 4
    reader = threading.Thread(target=stream)
    reader.start()
    done = wait_done(client, job["id"])
    reader.join(timeout=300)
    assert done["status"] == "succeeded", done
    assert done["epoch"] == 4 and done["step"] == 4 and done["loss"] > 0 and done["error"] is None
    assert done["adapter"]["name"] == "shouty" and done["adapter"]["layers"] == [3, 9]
    assert client.get("/v1/adapters/shouty", headers=ADMIN).json()["sha256"] == done["adapter"]["sha256"]
    out = client.post("/generate", json={"adapter": "shouty", "prompt": "Say hi.", "max_new_tokens": 4})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    assert len(streamed) == 25 and streamed[-1] == "data: [DONE]"  # 24 tokens, then [DONE]
    assert json.loads(streamed[-2][5:])["finish_reason"] == "length"


def test_a_cancelled_job_registers_nothing(client):
    r = client.post("/v1/adapters/train", json={"name": "never", "data": EXAMPLES, "epochs": 20,
                                               "batch_size": 1}, headers=ADMIN)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    cancelled = client.delete(f"/v1/adapters/train/{job_id}", headers=ADMIN)
    assert cancelled.status_code == 200
    done = wait_done(client, job_id)
    assert done["status"] == "cancelled" and done["step"] < 60
    error_of(client.get("/v1/adapters/never", headers=ADMIN), 404)


def test_bad_jobs_are_refused_with_the_reason(client):
    def start(body: dict, headers: dict | None = ADMIN) -> httpx.Response:
        return client.post("/v1/adapters/train", json=body, headers=headers)

    assert "admin key" in error_of(start({"name": "x", "data": EXAMPLES}, headers={}), 401)
    assert "data[1]" in error_of(start({"name": "x", "data": [EXAMPLES[0], {"prompt": "no completion"}]}), 400)
    assert "layers" in error_of(start({"name": "x", "data": EXAMPLES, "layers": [99]}), 400)
    assert "positions" in error_of(start({"name": "x", "data": EXAMPLES, "positions": "middle"}), 400)
    error_of(start({"name": ".hidden", "data": EXAMPLES}), 400)
    error_of(start({"name": "x", "data": []}), 422)
    error_of(start({"name": "x", "data": EXAMPLES, "epochs": 0}), 422)
    assert upload(client, "taken").status_code == 201
    assert "exists" in error_of(start({"name": "taken", "data": EXAMPLES}), 409)
    assert "does not exist" in error_of(client.get("/v1/adapters/train/train-999", headers=ADMIN), 404)
    error_of(client.delete("/v1/adapters/train/train-999", headers=ADMIN), 404)


def test_costly_jobs_are_refused_before_they_start_with_the_numbers(client):
    def start(**kw: object) -> httpx.Response:
        return client.post("/v1/adapters/train", json={"name": "costly", "data": EXAMPLES, **kw}, headers=ADMIN)

    message = error_of(start(rank=65), 400)  # the registry's REFT_MAX_RANK is 64: it could never be registered
    assert "rank 65" in message and "64" in message and "REFT_MAX_RANK" in message
    message = error_of(start(epochs=21, batch_size=1), 400)  # 21 epochs x 3 batches
    assert "63 steps" in message and "60" in message and "REFT_MAX_TRAIN_STEPS" in message
    long = [*EXAMPLES, {"prompt": "Say a lot.", "completion": "word " * 300}]
    message = error_of(start(data=long, batch_size=2, epochs=1), 413)
    assert "tokens" in message and "200" in message and "REFT_MAX_TRAIN_STEP_TOKENS" in message
    assert start(data=long, batch_size=1, epochs=1).status_code == 413  # one example alone is too long
    assert "costly" not in client.get("/v1/adapters", headers=ADMIN).text


def test_jobs_beyond_the_concurrency_bound_get_429(client):
    first = client.post("/v1/adapters/train", json={"name": "first", "data": EXAMPLES, "epochs": 20,
                                                   "batch_size": 1}, headers=ADMIN)
    assert first.status_code == 202, first.text
    try:
        message = error_of(client.post("/v1/adapters/train", json={"name": "second", "data": EXAMPLES},
                                       headers=ADMIN), 429)
        assert "1 training job" in message and "REFT_MAX_TRAIN_JOBS" in message
    finally:
        client.delete(f"/v1/adapters/train/{first.json()['id']}", headers=ADMIN)
    assert wait_done(client, first.json()["id"])["status"] == "cancelled"
    again = client.post("/v1/adapters/train", json={"name": "second", "data": EXAMPLES, "epochs": 1}, headers=ADMIN)
    assert again.status_code == 202, again.text  # the cancelled job no longer counts
    assert wait_done(client, again.json()["id"])["status"] == "succeeded"


def test_an_upload_of_the_name_while_the_job_trains_is_kept_and_reported(client):
    r = client.post("/v1/adapters/train", json={"name": "contested", "data": EXAMPLES, "epochs": 2,
                                               "batch_size": 1}, headers=ADMIN)
    assert r.status_code == 202, r.text
    uploaded = upload(client, "contested")
    assert uploaded.status_code == 201, uploaded.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "conflict", done
    assert "contested" in done["error"] and "changed while the job trained" in done["error"]
    assert done["adapter"] is None and done["step"] == 6
    assert client.get("/v1/adapters/contested", headers=ADMIN).json()["sha256"] == uploaded.json()["sha256"]
    trained = client.get(f"/v1/adapters/train/{r.json()['id']}/adapter", headers=ADMIN)
    assert trained.status_code == 200 and trained.content != EMOJI  # the result is not lost: it can be uploaded
    assert upload(client, "contested", trained.content, replace=True).status_code == 201


def test_a_delete_of_the_name_while_a_replacing_job_trains_is_not_undone(client):
    assert upload(client, "doomed").status_code == 201
    r = client.post("/v1/adapters/train", json={"name": "doomed", "data": EXAMPLES, "epochs": 2, "batch_size": 1,
                                               "replace": True}, headers=ADMIN)
    assert r.status_code == 202, r.text
    assert client.delete("/v1/adapters/doomed", headers=ADMIN).status_code == 204
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "conflict" and "deleted" in done["error"], done
    error_of(client.get("/v1/adapters/doomed", headers=ADMIN), 404)
    error_of(client.get("/v1/adapters/train/train-999/adapter", headers=ADMIN), 404)


@contextmanager
def registry_locked(directory: Path):
    """Hold the registry's cross-process lock, as a slow writer on another replica would."""
    fd = os.open(directory / ".registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_registering_the_result_never_stalls_serving(server, client):
    with registry_locked(server.registry):
        r = client.post("/v1/adapters/train", json={"name": "patient", "data": EXAMPLES, "epochs": 2},
                        headers=ADMIN)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while (job := client.get(f"/v1/adapters/train/{job_id}", headers=ADMIN).json())["step"] < 2:
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        out = client.post("/generate", json={"prompt": "Tell me a story.", "max_new_tokens": 8, "ignore_eos": True},
                          timeout=30)  # the engine thread is free while the registration waits for the lock
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 8
        assert client.get(f"/v1/adapters/train/{job_id}", headers=ADMIN).json()["status"] == "running"
    done = wait_done(client, job_id)
    assert done["status"] == "succeeded" and done["adapter"]["name"] == "patient", done
