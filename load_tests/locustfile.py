"""Locust users for reft-serve: a mix of adapters and the base model, streaming and not.

Run through `make load` (load_tests/run.py starts a server and runs this headless), or by hand:
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s
Set REFT_LOAD_ADAPTERS to a comma-separated list of adapter names (default: from /v1/models).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, events, task

QUESTIONS = [
    "What is the capital of France?", "Suggest a hobby.", "How do plants grow?", "Tell me about the moon.",
    "What should I cook tonight?", "Why is the sky blue?", "Name a good book.", "How are you today?",
]
MODELS: list[str] = []


@events.test_start.add_listener
def discover_models(environment, **_: object) -> None:
    names = [n for n in os.environ.get("REFT_LOAD_ADAPTERS", "").split(",") if n]
    if not names:
        import httpx

        listing = httpx.get(f"{environment.host}/v1/models", timeout=30).json()
        names = [m["id"] for m in listing["data"]]
    MODELS[:] = names + ["base"]


class CompletionUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task(4)
    def completion(self) -> None:
        model = random.choice(MODELS)
        body = {"model": model, "prompt": random.choice(QUESTIONS), "max_tokens": random.randint(8, 32),
                "temperature": random.choice([0, 0.7])}
        with self.client.post("/v1/completions", json=body, name="/v1/completions", catch_response=True) as r:
            if r.status_code == 429:
                r.success()  # back-pressure is the designed answer to overload
            elif r.status_code != 200 or "choices" not in r.json():
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def chat_stream(self) -> None:
        body = {"model": random.choice(MODELS), "stream": True, "max_tokens": 16,
                "messages": [{"role": "user", "content": random.choice(QUESTIONS)}]}
        with self.client.post("/v1/chat/completions", json=body, name="/v1/chat/completions [stream]",
                              stream=True, catch_response=True) as r:
            if r.status_code == 429:
                r.success()
                return
            lines = [ln for ln in r.iter_lines() if ln]
            if r.status_code != 200 or not lines or lines[-1] != b"data: [DONE]":
                r.failure(f"{r.status_code}: stream did not end with [DONE]")

    @task(1)
    def models(self) -> None:
        self.client.get("/v1/models")
