"""Training jobs over HTTP on a real server: start, follow, register, cancel, refuse; serving goes on."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import error_of

ADMIN = {"Authorization": "Bearer admin-secret"}
EXAMPLES = [
    {"prompt": "Say hi.", "completion": "HI THERE!"},
    {"prompt": "Name a fruit.", "completion": "A BANANA!"},
    {"prompt": "What is 2+2?", "completion": "FOUR!"},
]


@pytest.fixture(scope="module")
def client(tmp_path_factory, reft_server_factory):
    tmp = tmp_path_factory.mktemp("train-http")
    server = reft_server_factory(tmp / "adapters", tmp / "server.log", env={"REFT_ADMIN_KEY": "admin-secret"})
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def wait_done(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/adapters/train/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
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
    r = client.post("/v1/adapters/train", json={"name": "never", "data": EXAMPLES, "epochs": 10_000,
                                               "batch_size": 1}, headers=ADMIN)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    cancelled = client.delete(f"/v1/adapters/train/{job_id}", headers=ADMIN)
    assert cancelled.status_code == 200
    done = wait_done(client, job_id)
    assert done["status"] == "cancelled" and done["step"] < 10_000
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
    upload = client.post("/v1/adapters", data={"name": "taken"}, headers=ADMIN,
                         files={"file": ("e.safetensors", (Path(__file__).parents[1] / "adapters" /
                                                          "emoji.safetensors").read_bytes())})
    assert upload.status_code == 201, upload.text
    assert "exists" in error_of(start({"name": "taken", "data": EXAMPLES}), 409)
    assert "does not exist" in error_of(client.get("/v1/adapters/train/train-999", headers=ADMIN), 404)
    error_of(client.delete("/v1/adapters/train/train-999", headers=ADMIN), 404)
