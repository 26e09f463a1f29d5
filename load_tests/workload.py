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
    options_fraction: float = 0.5  # asks for further options: bias, penalties, logprobs, n, best_of, echo, stops
    composed_fraction: float = 0.1  # names two adapters composed ("a+b")
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


def options(endpoint: str, stream: bool, rng: random.Random) -> dict:
    """Some of the further options the endpoint accepts, each drawn on its own: whatever a request may ask for
    must be in the load, so that the replay alone judges it (and any state it could leave to other requests)."""
    out: dict = {}
    if rng.random() < 0.25:
        out["stop"] = rng.sample([".", ",", " the", "\n", " a"], rng.randint(1, 2))
    if endpoint == "generate":
        if rng.random() < 0.25:
            out["stop_token_ids"] = [rng.randrange(100, 49000) for _ in range(rng.randint(1, 3))]
        return out
    if rng.random() < 0.4:  # strong biases: one that reached another request would change its answer
        out["logit_bias"] = {str(rng.randrange(100, 49000)): rng.choice([100.0, -100.0, round(rng.uniform(-5, 5), 2)])
                             for _ in range(rng.randint(1, 3))}
    if rng.random() < 0.25:
        out["presence_penalty"], out["frequency_penalty"] = round(rng.uniform(-2, 2), 2), round(rng.uniform(-2, 2), 2)
    if rng.random() < 0.25:
        out["repetition_penalty"] = rng.choice([0.8, 1.2, 1.5])
    if rng.random() < 0.2:
        out["n"] = rng.randint(2, 3)
    if endpoint == "chat":
        if rng.random() < 0.3:
            out["logprobs"], out["top_logprobs"] = True, rng.randint(0, 5)
        return out
    if rng.random() < 0.3:
        out["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.15:
        out["echo"] = True
    if not stream and rng.random() < 0.15:
        out["best_of"] = out.get("n", 1) + rng.randint(1, 2)
    return out


def make_request(plan: Plan, rng: random.Random, weights: list[float]) -> dict:
    """One random inference request: {endpoint, stream, adapter, body}; `body` has no adapter field yet."""
    endpoint = rng.choice(ENDPOINTS)
    stream = rng.random() < plan.stream_fraction
    adapter = rng.choices(plan.adapters, weights)[0]
    if len(plan.adapters) > 1 and rng.random() < plan.composed_fraction:
        other = rng.choices([a for a in plan.adapters if a != adapter], [w for a, w in zip(plan.adapters, weights,
                            strict=True) if a != adapter])[0]
        adapter = f"{adapter}+{other}"
    n_prompt = log_uniform(rng, *plan.prompt_tokens)
    n_out = log_uniform(rng, *plan.output_tokens)
    sampling: dict = {"temperature": 0.0}
    if rng.random() < plan.seeded_fraction:
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)}
        if rng.random() < 0.3:
            sampling["top_k"] = rng.choice([5, 50])
    if rng.random() < plan.options_fraction:
        sampling |= options(endpoint, stream, rng)
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


def _widths(endpoint: str, logprobs: dict | None) -> list[int]:
    """How many alternatives each token's logprobs list (-1 where a completion's first echoed token has none)."""
    if not logprobs:
        return []
    if endpoint == "chat":
        return [len(t["top_logprobs"]) for t in logprobs.get("content") or []]
    return [-1 if top is None else len(top) for top in logprobs.get("top_logprobs") or []]


def _finish(rec: dict, choices: dict[int, dict]) -> None:
    """rec's choices in index order, and choice 0's text and ids as rec's own (what the plain-forward judge reads)."""
    rec["choices"] = [choices[i] for i in sorted(choices)]
    first = rec["choices"][0] if rec["choices"] else {"text": "", "token_ids": []}
    rec["text"], rec["token_ids"] = first["text"], first["token_ids"]


def parse_stream(lines: Iterable[str | bytes], endpoint: str, rec: dict, now: Callable[[], float] = time.time) -> None:
    """Fill `rec` (choices: text, token_ids and logprob widths each; choice 0's text and token_ids; prompt_ids where
    sent; usage, done, stream_error, t_first) from SSE lines."""
    choices: dict[int, dict] = {}
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
        if event.get("usage"):
            rec["usage"] = event["usage"]
        pieces = [(0, event.get("text", ""), event.get("token_ids") or [], None)] if endpoint == "generate" else [
            (c.get("index", 0), (c.get("text") if endpoint == "completions" else c.get("delta", {}).get("content"))
             or "", c.get("token_ids") or [], c.get("logprobs")) for c in event.get("choices") or []]
        for c in event.get("choices") or []:
            prompt_ids = event.get("prompt_token_ids") or c.get("prompt_token_ids")
            if prompt_ids:
                rec["prompt_ids"] = prompt_ids
        for index, piece, ids, logprobs in pieces:
            choice = choices.setdefault(index, {"text": "", "token_ids": [], "widths": []})
            choice["text"] += piece
            choice["token_ids"] += ids
            choice["widths"] += _widths(endpoint, logprobs)
            if (piece or ids) and rec.get("t_first") is None:
                rec["t_first"] = now()
    _finish(rec, choices)


def parse_whole(body: dict, endpoint: str, rec: dict) -> None:
    """Fill `rec` (as parse_stream does, without the stream's own fields) from a non-streaming response body."""
    rec["usage"] = body.get("usage")
    if endpoint == "generate":
        _finish(rec, {0: {"text": body["text"], "token_ids": body["token_ids"], "widths": []}})
        return
    choices = {}
    for c in body["choices"]:
        text = c["text"] if endpoint == "completions" else c["message"]["content"]
        choices[c.get("index", 0)] = {"text": text, "token_ids": c.get("token_ids") or [],
                                      "widths": _widths(endpoint, c.get("logprobs"))}
        prompt_ids = body.get("prompt_token_ids") or c.get("prompt_token_ids")
        if prompt_ids:
            rec["prompt_ids"] = prompt_ids
    _finish(rec, choices)


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(inference records, adapter-write records) from the JSON-lines file."""
    gens, admin = [], []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                (gens if rec["kind"] == "gen" else admin).append(rec)
    return gens, admin
