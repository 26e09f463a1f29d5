"""`make load`: many users over many adapters while adapters are replaced, then check every answer.

1. Writes N random LoReFT adapters for the base model's shape (and a pool of further versions) into a fresh
   registry and starts a server on it (127.0.0.1, with an admin key); or, with --url, uploads them to yours.
2. Runs load_tests/locustfile.py headless, bounded in users and time: inference users (Zipf over the
   adapters, some composed "a+b"; prompts and outputs of random lengths; completions, chat and /generate;
   streaming or not; greedy or seeded sampling, with top-k, logit_bias, presence/frequency/repetition
   penalties, logprobs, n, best_of, echo, stop strings and stop token ids drawn per request, so that the
   replay alone judges each of them) and admin users replacing served adapters and uploading/deleting
   scratch ones.
   The server's RSS is sampled throughout.
3. Checks: every adapter write that was acknowledged is in the registry with its sha256 (deleted ones gone);
   each answer (all, or as many as --verify-seconds allow) equals the same request run alone against the
   idle server with the adapter version that was current when it was sent (each version is uploaded again
   under its own name for this): every choice's text and token ids, and the number of logprob alternatives
   of each token. A request's version is known from the times of the replacements: a
   version is a candidate if it may have been current between sending and the first token (streaming) or
   the answer (not streaming); almost always there is one. Answers whose adapter was replaced while they
   were still running must equal their starting version. An answer no version gives alone must hold,
   token by token, under a plain forward of a candidate version with the request's seed, up to float
   near-ties (reference.py), or it is wrong.
Prints requests/s, tokens/s, latency and time-to-first-token percentiles, errors by status, RSS; writes the
full result to --out. Exit status 1 if any target is missed: a 5xx or broken connection, a wrong answer,
a lost adapter, or (runs of at least --soak-min-seconds) growth of 5% or more after warm-up in the RSS
outside the KV pool (the pool's pages become resident as rows first reach them, up to its fixed size).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from load_tests.reference import Reference, Verdict, sampling_params  # noqa: E402
from load_tests.workload import PATHS, Plan, parse_stream, parse_whole, read_records, with_adapter  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RSS_LIMIT = 0.05


# ---- set-up ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The adapters a run serves, the files of every version it may upload, and where it writes."""

    workdir: Path
    registry: Path
    adapters: list[str]
    initial: dict[str, Path]  # name -> the bytes it starts with (kept outside the registry)
    pool: list[Path] = field(default_factory=list)
    model: str | None = None  # the base model the server runs (None: the default)


def prepare(workdir: Path, n_adapters: int = 50, n_pool: int = 100, seed: int = 0, model: str | None = None) -> Setup:
    """Random LoReFT adapters a00.. in workdir/registry, copies of them and a pool of other versions beside it."""
    from bench.common import base_shape, random_loreft
    from server import adapter_file

    shape = base_shape(model)
    registry, versions = workdir / "registry", workdir / "versions"
    registry.mkdir(parents=True, exist_ok=True)
    versions.mkdir(parents=True, exist_ok=True)
    names = [f"a{i:02d}" for i in range(n_adapters)]
    initial = {}
    for i, name in enumerate(names):
        data = adapter_file.to_bytes(random_loreft(shape, seed * 100_000 + i))
        (registry / f"{name}.safetensors").write_bytes(data)
        initial[name] = versions / f"{name}-initial.safetensors"
        initial[name].write_bytes(data)
    pool = []
    for j in range(n_pool):
        path = versions / f"pool-{j:04d}.safetensors"
        path.write_bytes(adapter_file.to_bytes(random_loreft(shape, seed * 100_000 + 50_000 + j)))
        pool.append(path)
    return Setup(workdir, registry, names, initial, pool, model)


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def upload(client: httpx.Client, name: str, path: Path, admin_key: str | None, replace: bool = True) -> dict:
    r = client.post("/v1/adapters", data={"name": name, "replace": "true" if replace else "false"},
                    files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, headers=auth(admin_key))
    if r.status_code != 201:
        raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text[:300]}")
    return r.json()


# ---- the run ---------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """The server's resident set size once a second: (seconds since start, bytes, bytes of it in the KV pool).

    The engine's KV pool on CPU is one shared anonymous mapping each for keys and values (engine/kv_cache.py),
    sized by REFT_KV_CACHE_BYTES when the server starts; its pages become resident as rows first write them, so
    RSS climbs while traffic reaches slots not used before, up to that fixed bound. The soak judges the rest.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.t0 = pid, [], time.monotonic()
        self._stop_event = threading.Event()

    def read(self) -> tuple[int, int] | None:
        try:
            return _resident(Path(f"/proc/{self.pid}/smaps").read_text())
        except OSError:
            return None

    def run(self) -> None:
        while True:
            sample = self.read()
            if sample is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), *sample))
            if self._stop_event.wait(1.0):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


KV_POOL_MIN_BYTES = 64 * 2**20


def _resident(smaps: str) -> tuple[int, int]:
    """(RSS, RSS of the KV pool) from a /proc/PID/smaps text. Python's `mmap.mmap(-1, n)` is a shared anonymous
    mapping, which smaps names "/dev/zero (deleted)"; the pool's two (keys, values) are the large ones."""
    total = pool = 0
    in_pool = False
    size = 0
    for line in smaps.splitlines():
        field_name, _, rest = line.partition(":")
        if field_name == "Size":
            size = int(rest.split()[0]) * 1024
        elif field_name == "Rss":
            rss = int(rest.split()[0]) * 1024
            total += rss
            if in_pool and size >= KV_POOL_MIN_BYTES:
                pool += rss
        elif " " in field_name:  # a mapping's header: "start-end perms offset dev inode [path]"
            in_pool = line.split(maxsplit=5)[5:] == ["/dev/zero (deleted)"]
    return total, pool

def run_locust(url: str, plan: Plan, users: int, admin_users: int, seconds: int, stop_timeout: int,
               workdir: Path) -> None:
    """Locust headless in its own process (it patches the standard library with gevent)."""
    plan_path = workdir / "plan.json"
    plan.dump(plan_path)
    exe = Path(sys.executable).with_name("locust")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "locust"]
    total = users + admin_users
    cmd += ["-f", str(LOCUSTFILE), "--host", url, "--headless", "-u", str(total), "-r", str(max(1, total // 2)),
            "-t", f"{seconds}s", "--stop-timeout", str(stop_timeout), "--only-summary", "--exit-code-on-error", "0",
            "--loglevel", "WARNING"]
    env = {**os.environ, "REFT_LOAD_PLAN": str(plan_path), "REFT_LOAD_ADMIN_USERS": str(admin_users)}
    with open(workdir / "locust.log", "ab") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + stop_timeout + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited with {proc.returncode}; see {workdir / 'locust.log'}")


# ---- checks ----------------------------------------------------------------------------------------


def version_timeline(setup: Setup, admin: list[dict]) -> dict[str, list[dict]]:
    """Per served adapter, its versions in order: file, and the window in which it became current.

    Version k may have become current from t_start (its upload began) and surely was at t_ack (201).
    A replacement that got no answer may or may not have happened: its t_ack is infinite.
    """
    timeline = {name: [{"k": 0, "file": str(path), "t_start": -math.inf, "t_ack": -math.inf}]
                for name, path in setup.initial.items()}
    for rec in sorted((a for a in admin if a["op"] == "replace"), key=lambda a: a["t_start"]):
        if rec["status"] == 201 or rec["status"] == 0 or rec["status"] >= 500:
            versions = timeline[rec["name"]]
            t_ack = rec["t_ack"] if rec["status"] == 201 else math.inf
            versions.append({"k": len(versions), "file": rec["file"], "t_start": rec["t_start"], "t_ack": t_ack})
    return timeline


def candidates(versions: list[dict], rec: dict) -> list[dict]:
    """The versions that may have been pinned by this request (current at some moment it could be pinned)."""
    bound = rec["t_first"] if rec["stream"] and rec.get("t_first") else rec["t_end"]
    out = []
    for i, v in enumerate(versions):
        superseded = versions[i + 1]["t_ack"] if i + 1 < len(versions) else math.inf
        if v["t_start"] <= bound and superseded >= rec["t_send"]:
            out.append(v)
    return out


def replaced_mid_flight(versions: list[dict], version: dict, rec: dict) -> bool:
    """A newer version was acknowledged before this request's answer ended."""
    later = [v for v in versions if v["k"] > version["k"]]
    return bool(later) and later[0]["t_ack"] <= rec["t_end"]


def composed_candidates(timeline: dict[str, list[dict]], rec: dict) -> list[dict]:
    """`candidates` of rec's adapter, each with its parts [(name, version)]; for a composition ("a+b"), every
    combination of its parts' candidates, with the versions joined in "k" ("1+0") and the files listed in order."""
    names = rec["adapter"].split("+")
    out = []
    for combo in itertools.product(*(candidates(timeline[name], rec) for name in names)):
        parts = list(zip(names, combo, strict=True))
        if len(combo) == 1:
            out.append({**combo[0], "parts": parts})
        else:
            out.append({"k": "+".join(str(v["k"]) for v in combo), "file": [v["file"] for v in combo],
                        "parts": parts})
    return out


def check_registry(client: httpx.Client, setup: Setup, admin: list[dict], timeline: dict[str, list[dict]]) -> dict:
    """Every acknowledged write is there with its bytes; every acknowledged delete is gone."""
    listed, after = {}, None
    while True:
        r = client.get("/v1/adapters", params={"limit": 100, **({"after": after} if after else {})})
        r.raise_for_status()
        page = r.json()
        listed.update({d["name"]: d for d in page["data"]})
        if not page.get("has_more"):
            break
        after = page["next_after"]
    sha = {}

    def file_sha(path: str) -> str:
        if path not in sha:
            sha[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return sha[path]

    lost, wrong_bytes, resurrected = [], [], []
    for name, versions in timeline.items():
        acked = [v for v in versions if v["t_ack"] < math.inf]
        allowed = {file_sha(v["file"]) for v in versions[versions.index(acked[-1]):]}
        if name not in listed:
            lost.append(name)
        elif listed[name]["sha256"] not in allowed:
            wrong_bytes.append(name)
    scratch: dict[str, str] = {}
    for rec in sorted((a for a in admin if a["op"] in ("upload", "delete")), key=lambda a: a["t_ack"]):
        if rec["op"] == "upload" and rec["status"] == 201:
            scratch[rec["name"]] = file_sha(rec["file"])
        elif rec["op"] == "delete" and rec["status"] == 204:
            scratch[rec["name"]] = ""
        elif rec["op"] == "delete":
            scratch.pop(rec["name"], None)  # no answer: either state is right
    for name, digest in scratch.items():
        if digest and name not in listed:
            lost.append(name)
        elif digest and listed[name]["sha256"] != digest:
            wrong_bytes.append(name)
        elif not digest and name in listed:
            resurrected.append(name)
    return {"listed": len(listed), "checked": len(timeline) + len(scratch), "lost": lost,
            "wrong_bytes": wrong_bytes, "resurrected": resurrected}


def wait_idle(client: httpx.Client, timeout: float = 300.0) -> None:
    """Until the server reports nothing running or waiting (requests locust abandoned at its stop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/metrics")
        if r.status_code != 200:
            time.sleep(10)
            return
        values = dict(re.findall(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})? (\S+)$", r.text, re.M))
        if values and all(float(v) == 0 for v in values.values()):
            return
        time.sleep(0.5)


def run_alone(client: httpx.Client, rec: dict, adapter: str) -> dict:
    endpoint = rec["endpoint"]
    body = with_adapter(endpoint, rec["body"], adapter)
    out: dict = {"t_first": None}
    if rec["stream"]:
        with client.stream("POST", PATHS[endpoint], json=body) as r:
            out["status"] = r.status_code
            if r.status_code == 200:
                parse_stream(r.iter_lines(), endpoint, out)
            else:
                r.read()
                out["error"] = r.text[:300]
    else:
        r = client.post(PATHS[endpoint], json=body)
        out["status"] = r.status_code
        if r.status_code == 200:
            parse_whole(r.json(), endpoint, out)
        else:
            out["error"] = r.text[:300]
    return out


def same_answer(a: dict, b: dict) -> bool:
    """Every choice's text and token ids, and how many logprob alternatives each token lists."""
    return (a.get("text") == b.get("text") and a.get("token_ids") == b.get("token_ids")
            and a.get("choices") == b.get("choices"))


def prompt_ids(rec: dict) -> list[int] | None:
    """The ids the server read: the request's own, or those it returned (chat renders a template)."""
    prompt = rec["body"].get("prompt")
    return prompt if isinstance(prompt, list) else rec.get("prompt_ids")


def verify_answers(client: httpx.Client, gens: list[dict], timeline: dict[str, list[dict]], admin_key: str | None,
                   budget_s: float, seed: int = 0, reference: Callable[[], Reference] | None = None) -> dict:
    """Replay answered requests alone (the server otherwise idle) and compare, within a time budget.

    Requests whose adapter was replaced while they ran, or whose version is ambiguous, go first. An
    answer that no candidate version gives alone is checked token by token against a candidate's
    plain forward (`reference.py`): it holds there up to float near-ties, and is counted and shown
    apart, or it is wrong. `reference` builds that model on first use (default: the default base model).
    """
    ok = [g for g in gens if g["status"] == 200 and g.get("done", True) and "stream_error" not in g]
    jobs = []
    for rec in ok:
        cands = composed_candidates(timeline, rec)
        mid = len(cands) == 1 and any(replaced_mid_flight(timeline[name], v, rec) for name, v in cands[0]["parts"])
        jobs.append((0 if mid or len(cands) > 1 else 1, rec, cands, mid))
    random.Random(seed).shuffle(jobs)
    jobs.sort(key=lambda j: j[0])
    uploaded: set[str] = set()
    result = {"answered": len(ok), "verified": 0, "matched": 0, "near_ties": [], "wrong": [], "ambiguous_version": 0,
              "replaced_mid_flight": 0, "replaced_mid_flight_ok": 0, "replay_errors": 0}
    deadline = time.monotonic() + budget_s
    judge = functools.cache(reference or Reference)  # the model loads on the first answer that needs it
    wait_idle(client)

    def replay(rec: dict, cands: list[dict]) -> tuple[dict | None, dict[int | str, dict]]:
        """The first candidate version whose replay alone gives rec's answer; the replays, by version."""
        answers: dict[int | str, dict] = {}
        for v in cands:
            refs = []
            for name, part in v["parts"]:
                refs.append(f"ref-{name}-{part['k']}")
                if refs[-1] not in uploaded:
                    upload(client, refs[-1], Path(part["file"]), admin_key)
                    uploaded.add(refs[-1])
            answer = answers[v["k"]] = run_alone(client, rec, "+".join(refs))
            if answer["status"] != 200:
                result["replay_errors"] += 1
            elif same_answer(rec, answer):
                return v, answers
        return None, answers

    def explain(rec: dict, cands: list[dict]) -> tuple[dict | None, Verdict]:
        """The first candidate version whose plain forward explains every choice of rec's answer up to near-ties.

        Choice i of n draws with the seed of copy i; a choice of best_of may be any copy's."""
        prompt, verdict = prompt_ids(rec), Verdict(wrong_step=0)
        choices = rec.get("choices") or [{"token_ids": rec.get("token_ids")}]
        if not prompt or not all(c.get("token_ids") for c in choices):
            return None, verdict
        body = rec["body"]
        n, copies = int(body.get("n", 1)), int(body.get("best_of") or body.get("n", 1))
        for v in cands:
            verdict = Verdict()
            for i, choice in enumerate(choices):
                ids = choice["token_ids"]
                for copy in range(copies) if copies > n else [i]:
                    found = judge().explain(prompt, ids, sampling_params(rec["endpoint"], body, len(ids), copy),
                                            v["file"])
                    if found.explained:
                        break
                verdict.checked += found.checked
                verdict.near_ties += found.near_ties
                if not found.explained:
                    verdict.wrong_step = found.wrong_step
                    break
            if verdict.explained:
                return v, verdict
        return None, verdict

    for _, rec, cands, mid in jobs:
        if time.monotonic() > deadline:
            break
        matched, replays = replay(rec, cands)
        verdict = None
        if matched is None:
            matched, verdict = explain(rec, cands)
        alone = replays.get(matched["k"] if matched else cands[-1]["k"], {}) if cands else {}
        result["verified"] += 1
        result["ambiguous_version"] += len(cands) > 1
        result["replaced_mid_flight"] += mid
        detail = {"id": rec["id"], "endpoint": rec["endpoint"], "stream": rec["stream"], "adapter": rec["adapter"],
                  "sampled": rec["body"].get("temperature", 1.0) > 0, "candidates": [v["k"] for v in cands],
                  "version": matched["k"] if matched else None,
                  "same_prefix_chars": len(os.path.commonprefix([rec.get("text", ""), alone.get("text", "")])),
                  "got": rec.get("text", "")[:200], "alone": alone.get("text", "")[:200]}
        if verdict is not None:
            detail |= {"tokens": len(rec.get("token_ids") or []), "near_tie_steps": verdict.near_ties,
                       "wrong_step": verdict.wrong_step}
        if matched is None:
            result["wrong"].append(detail)
            continue
        result["replaced_mid_flight_ok"] += mid
        if verdict is not None:
            result["near_ties"].append(detail)
        else:
            result["matched"] += 1
    return result


# ---- figures ---------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(gens: list[dict], admin: list[dict], rss: list[tuple[float, int, int]], warmup_s: float) -> dict:
    ok = [g for g in gens if g["status"] == 200 and g.get("done", True) and "stream_error" not in g]
    span = (max(g["t_end"] for g in gens) - min(g["t_send"] for g in gens)) if gens else 0.0
    latency = [g["t_end"] - g["t_send"] for g in ok]
    ttft = [g["t_first"] - g["t_send"] for g in ok if g["stream"] and g.get("t_first")]
    out_tokens = sum((g.get("usage") or {}).get("completion_tokens", 0) for g in ok)
    in_tokens = sum((g.get("usage") or {}).get("prompt_tokens", 0) for g in ok)
    statuses = Counter(str(g["status"]) for g in gens if g["status"] != 200)
    statuses.update("stream error" for g in gens if g["status"] == 200 and "stream_error" in g)
    by_endpoint = Counter(f"{g['endpoint']}{' stream' if g['stream'] else ''}" for g in ok)
    admin_ops = Counter(f"{a['op']} {a['status']}" for a in admin)
    fig = {
        "seconds": round(span, 1), "requests": len(gens), "answered": len(ok),
        "requests_per_s": round(len(ok) / span, 3) if span else None,
        "output_tokens_per_s": round(out_tokens / span, 1) if span else None,
        "prompt_tokens_per_s": round(in_tokens / span, 1) if span else None,
        "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "latency_s": {f"p{q}": _r(percentile(latency, q)) for q in (50, 95, 99)},
        "ttft_s": {f"p{q}": _r(percentile(ttft, q)) for q in (50, 95, 99)},
        "errors_by_status": dict(statuses), "answered_by_endpoint": dict(by_endpoint),
        "server_errors": sum(n for s, n in statuses.items() if s == "0" or s.startswith("5") or s == "stream error"),
        "adapter_writes": dict(admin_ops),
        "admin_errors": sum(1 for a in admin if a["status"] == 0 or a["status"] >= 500),
    }
    if rss:
        # Growth is judged on RSS outside the KV pool: the pool is bounded by REFT_KV_CACHE_BYTES by construction.
        rest = [(t, b - pool) for t, b, pool in rss]
        warm = next((b for t, b in rest if t >= warmup_s), rest[-1][1])
        fig["rss_mib"] = {"start": _mib(rss[0][1]), "end": _mib(rss[-1][1]), "peak": _mib(max(b for _, b, _ in rss)),
                          "kv_pool_end": _mib(rss[-1][2]), "outside_pool_start": _mib(rest[0][1]),
                          "outside_pool_after_warmup": _mib(warm), "outside_pool_end": _mib(rest[-1][1]),
                          "warmup_s": warmup_s, "growth_after_warmup": round((rest[-1][1] - warm) / warm, 4)}
    return fig


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _mib(b: int) -> float:
    return round(b / 2**20, 1)


def report(result: dict) -> str:
    f, v, reg = result["figures"], result["verification"], result["registry"]
    lines = [
        f"load: {result['config']['users']} users + {result['config']['admin_users']} admin users, "
        f"{result['config']['adapters']} adapters (Zipf s={result['config']['zipf_s']}), prompts "
        f"{result['config']['prompt_tokens']} tokens, outputs {result['config']['output_tokens']} tokens, "
        f"{f['seconds']} s",
        f"  answered {f['answered']} of {f['requests']} requests: {f['requests_per_s']} req/s, "
        f"{f['output_tokens_per_s']} output tok/s, {f['prompt_tokens_per_s']} prompt tok/s",
        f"  by endpoint: {f['answered_by_endpoint']}",
        f"  latency p50/p95/p99: {f['latency_s']['p50']} / {f['latency_s']['p95']} / {f['latency_s']['p99']} s; "
        f"TTFT (streaming) p50/p95/p99: {f['ttft_s']['p50']} / {f['ttft_s']['p95']} / {f['ttft_s']['p99']} s",
        f"  errors by status: {f['errors_by_status'] or 'none'}; adapter writes: {f['adapter_writes']}",
        f"  answers verified alone: {v['verified']} of {v['answered']}, matched {v['matched']}, float near-ties "
        f"{len(v['near_ties'])} (explained by a plain forward, see reference.py), wrong {len(v['wrong'])}, "
        f"ambiguous version {v['ambiguous_version']}, replaced mid-flight "
        f"{v['replaced_mid_flight']} (all with their starting version: "
        f"{v['replaced_mid_flight_ok'] == v['replaced_mid_flight']})",
        f"  registry: {reg['checked']} adapters checked, lost {len(reg['lost'])}, wrong bytes "
        f"{len(reg['wrong_bytes'])}, deleted but present {len(reg['resurrected'])}",
    ]
    for kind, items in (("NEAR-TIE", v["near_ties"]), ("WRONG", v["wrong"])):
        for w in items:
            lines.append(f"  {kind} {w['id']} {w['endpoint']}{' stream' if w['stream'] else ''} "
                         f"{'sampled' if w['sampled'] else 'greedy'} {w['adapter']} versions {w['candidates']}"
                         f"{'' if w.get('version') is None else ' (explained by ' + str(w['version']) + ')'}"
                         f"{_steps(w)}: same for {w['same_prefix_chars']} chars; got {w['got']!r}, "
                         f"alone {w['alone']!r}")
    if "rss_mib" in f:
        m = f["rss_mib"]
        lines.append(f"  server RSS MiB: start {m['start']}, end {m['end']}, peak {m['peak']}, of it KV pool at the "
                     f"end {m['kv_pool_end']}; outside the pool: start {m['outside_pool_start']}, after "
                     f"{m['warmup_s']:.0f} s warm-up {m['outside_pool_after_warmup']}, end {m['outside_pool_end']}, "
                     f"growth after warm-up {100 * m['growth_after_warmup']:.1f}%")
    lines.append("  targets: " + ("all met" if not result["failures"] else "MISSED: " + "; ".join(result["failures"])))
    return "\n".join(lines)


def _steps(w: dict) -> str:
    """Where the plain forward placed an answer's near-ties, or its first token no candidate would pick."""
    if "tokens" not in w:
        return ""
    if w["wrong_step"] is not None:
        return f", token {w['wrong_step']} of {w['tokens']} not the candidate's pick"
    return f", near-tie at token {w['near_tie_steps']} of {w['tokens']}"


def failures(result: dict, soak_min_s: float) -> list[str]:
    f, v, reg = result["figures"], result["verification"], result["registry"]
    out = []
    if f["server_errors"] or f["admin_errors"]:
        out.append(f"{f['server_errors'] + f['admin_errors']} 5xx or broken requests")
    if v["wrong"]:
        out.append(f"{len(v['wrong'])} wrong answers")
    if v["replay_errors"]:
        out.append(f"{v['replay_errors']} replays failed")
    if reg["lost"] or reg["wrong_bytes"] or reg["resurrected"]:
        out.append(f"registry: lost {reg['lost']}, wrong bytes {reg['wrong_bytes']}, deleted {reg['resurrected']}")
    if not f["answered"]:
        out.append("no request was answered")
    m = f.get("rss_mib")
    if m and f["seconds"] >= soak_min_s and m["growth_after_warmup"] >= RSS_LIMIT:
        out.append(f"RSS outside the KV pool grew {100 * m['growth_after_warmup']:.1f}% after warm-up")
    return out


# ---- entry points ----------------------------------------------------------------------------------


def run(url: str, setup: Setup, *, users: int, admin_users: int, seconds: int, prompt_tokens: tuple[int, int],
        output_tokens: tuple[int, int], admin_key: str | None = None, server_pid: int | None = None,
        verify_seconds: float = 600.0, warmup_s: float | None = None, stop_timeout: int = 60, zipf_s: float = 1.0,
        admin_wait: tuple[float, float] = (0.5, 2.0), soak_min_s: float = 300.0, seed: int = 0) -> dict:
    """One load run against the server at `url` serving `setup`'s adapters; returns figures and verdicts."""
    records = setup.workdir / "records.jsonl"
    records.unlink(missing_ok=True)
    plan = Plan(adapters=setup.adapters, records=str(records), pool=[str(p) for p in setup.pool], zipf_s=zipf_s,
                prompt_tokens=prompt_tokens, output_tokens=output_tokens, admin_key=admin_key,
                admin_wait=admin_wait, seed=seed)
    sampler = RssSampler(server_pid) if server_pid else None
    if sampler:
        sampler.start()
    try:
        run_locust(url, plan, users, admin_users, seconds, stop_timeout, setup.workdir)
    finally:
        if sampler:
            sampler.stop()
    gens, admin = read_records(records)
    timeline = version_timeline(setup, admin)
    with httpx.Client(base_url=url, timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        registry = check_registry(client, setup, admin, timeline)
        verification = verify_answers(client, gens, timeline, admin_key, verify_seconds, seed,
                                      lambda: Reference(setup.model))
    warm = warmup_s if warmup_s is not None else max(30.0, 0.2 * seconds)
    result = {
        "config": {"users": users, "admin_users": admin_users, "adapters": len(setup.adapters), "zipf_s": zipf_s,
                   "prompt_tokens": list(prompt_tokens), "output_tokens": list(output_tokens), "seconds": seconds},
        "figures": summarize(gens, admin, sampler.samples if sampler else [], warm),
        "verification": verification, "registry": registry,
        "rss_samples": sampler.samples if sampler else [],
    }
    result["failures"] = failures(result, soak_min_s)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=64, help="concurrent inference users (default 64)")
    p.add_argument("--admin-users", type=int, default=2, help="users replacing/uploading/deleting adapters")
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--seconds", type=int, default=600, help="load duration (default 600)")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(1, 256), metavar=("MIN", "MAX"))
    p.add_argument("--verify-seconds", type=float, default=900.0, help="time budget for replaying answers alone")
    p.add_argument("--warmup-seconds", type=float, default=None, help="RSS growth is measured after this")
    p.add_argument("--soak-min-seconds", type=float, default=300.0, help="shorter runs do not judge RSS growth")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--url", help="use this running server (the adapters are uploaded to it) instead of starting one")
    p.add_argument("--admin-key", default=os.environ.get("REFT_ADMIN_KEY"), help="for --url servers that need one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for RSS")
    p.add_argument("--workdir", type=Path, help="keep adapters, records and logs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "latest.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="reft-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n_pool = max(20, args.seconds // 2)
    setup = prepare(workdir, args.adapters, n_pool, args.seed)
    common = dict(users=args.users, admin_users=args.admin_users, seconds=args.seconds,
                  prompt_tokens=tuple(args.prompt_tokens), output_tokens=tuple(args.output_tokens),
                  verify_seconds=args.verify_seconds, warmup_s=args.warmup_seconds, zipf_s=args.zipf,
                  soak_min_s=args.soak_min_seconds, seed=args.seed)
    print(f"work directory: {workdir}", flush=True)
    if args.url:
        with httpx.Client(base_url=args.url, timeout=60) as client:
            for name, path in setup.initial.items():
                upload(client, name, path, args.admin_key)
        result = run(args.url, setup, admin_key=args.admin_key, server_pid=args.server_pid, **common)
    else:
        from bench.common import ServerProcess

        admin_key = secrets.token_hex(16)
        server = ServerProcess(setup.registry, workdir / "server.log", env={"REFT_ADMIN_KEY": admin_key})
        print(f"server ready in {server.start():.1f} s; load for {args.seconds} s ...", flush=True)
        try:
            result = run(server.url, setup, admin_key=admin_key, server_pid=server.proc.pid, **common)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"full result: {args.out}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
