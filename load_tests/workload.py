"""The load test's workload and its records: shared by the locust users and the driver (stdlib only).

A `Plan` (JSON, written by the driver, read by locustfile.py through REFT_LOAD_PLAN) says what to send;
every finished request and every adapter write is appended to the records file as one JSON line, so the
driver can check correctness afterwards without trusting locust's own statistics.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue side "
    "kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river mountain garden window bread music light paper table colour summer winter ocean forest market"
).split()
ENDPOINTS = ("completions", "chat", "generate")


@dataclass
class Plan:
    """What the users send. Lengths are drawn log-uniformly between their bounds (both included)."""

    adapters: list[str]
    records: str
    pool: list[str] = field(default_factory=list)  # adapter files for replacements and scratch uploads
    zipf_s: float = 1.0
    prompt_tokens: tuple[int, int] = (16, 1024)
    output_tokens: tuple[int, int] = (1, 256)
    stream_fraction: float = 0.5
    seeded_fraction: float = 0.25  # sampled with a seed (reproducible); the rest greedy
    admin_key: str | None = None
    admin_wait: tuple[float, float] = (0.5, 2.0)
    seed: int = 0

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Plan:
        raw = json.loads(Path(path).read_text())
        raw["prompt_tokens"], raw["output_tokens"] = tuple(raw["prompt_tokens"]), tuple(raw["output_tokens"])
        raw["admin_wait"] = tuple(raw["admin_wait"])
        return cls(**raw)


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank + 1) ** s for rank in range(n)]


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))) - 0.5)))


def make_request(plan: Plan, rng: random.Random, weights: list[float]) -> dict:
    """One random inference request: {endpoint, stream, adapter, body}; `body` has no adapter field yet."""
    endpoint = rng.choice(ENDPOINTS)
    stream = rng.random() < plan.stream_fraction
    adapter = rng.choices(plan.adapters, weights)[0]
    n_prompt = log_uniform(rng, *plan.prompt_tokens)
    n_out = log_uniform(rng, *plan.output_tokens)
    sampling: dict = {"temperature": 0.0}
    if rng.random() < plan.seeded_fraction:
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)}
    if endpoint == "chat":
        # Words of this list are one token each; the chat template adds about ten more.
        text = " ".join(rng.choice(WORDS) for _ in range(n_prompt))
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": n_out, **sampling}
    else:
        ids = [rng.randrange(100, 49000) for _ in range(n_prompt)]
        key = "max_tokens" if endpoint == "completions" else "max_new_tokens"
        body = {"prompt": ids, key: n_out, "ignore_eos": True, **sampling}
    if endpoint != "generate":
        body["return_token_ids"] = True  # the verifier needs the ids an answer is made of (/generate sends them)
    if stream:
        body["stream"] = True
        if endpoint != "generate":
            body["stream_options"] = {"include_usage": True}
    return {"endpoint": endpoint, "stream": stream, "adapter": adapter, "body": body}


def with_adapter(endpoint: str, body: dict, adapter: str) -> dict:
    """The request body naming `adapter` where its endpoint expects it."""
    return {**body, ("adapter" if endpoint == "generate" else "model"): adapter}


PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "generate": "/generate"}


def parse_stream(lines: Iterable[str | bytes], endpoint: str, rec: dict, now: Callable[[], float] = time.time) -> None:
    """Fill `rec` (text, token_ids, prompt_ids where sent, usage, done, stream_error, t_first) from SSE lines."""
    texts, ids = [], []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            rec["done"] = True
            break
        event = json.loads(data)
        if "error" in event:
            rec["stream_error"] = event["error"]
            continue
        if endpoint == "generate":
            piece, got_token = event.get("text", ""), bool(event.get("token_ids"))
            ids.extend(event.get("token_ids", []))
        elif event.get("choices"):
            choice = event["choices"][0]
            piece = (choice.get("text") if endpoint == "completions" else choice.get("delta", {}).get("content")) or ""
            got_token = bool(piece) or bool(choice.get("token_ids"))
            ids.extend(choice.get("token_ids") or [])
            prompt_ids = event.get("prompt_token_ids") or choice.get("prompt_token_ids")
            if prompt_ids:
                rec["prompt_ids"] = prompt_ids
        else:
            piece, got_token = "", False
        if got_token and rec.get("t_first") is None:
            rec["t_first"] = now()
        texts.append(piece)
        if event.get("usage"):
            rec["usage"] = event["usage"]
    rec["text"] = "".join(texts)
    rec["token_ids"] = ids


def parse_whole(body: dict, endpoint: str, rec: dict) -> None:
    """Fill `rec` (text, token_ids, prompt_ids where sent, usage) from a non-streaming response body."""
    rec["usage"] = body.get("usage")
    if endpoint == "generate":
        rec["text"], rec["token_ids"] = body["text"], body["token_ids"]
        return
    choice = body["choices"][0]
    rec["text"] = choice["text"] if endpoint == "completions" else choice["message"]["content"]
    rec["token_ids"] = choice.get("token_ids") or []
    prompt_ids = body.get("prompt_token_ids") or choice.get("prompt_token_ids")
    if prompt_ids:
        rec["prompt_ids"] = prompt_ids


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(inference records, adapter-write records) from the JSON-lines file."""
    gens, admin = [], []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                (gens if rec["kind"] == "gen" else admin).append(rec)
    return gens, admin
