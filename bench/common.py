"""Helpers for the benchmarks: random adapters, the server subprocess, the baseline worker, HTTP load."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from server import adapter_file
from server.model import ModelShape
from server.positions import Positions

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


# ---- machine and versions ------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
        "mem_gib": mem_gib, "platform": platform.platform(), "hostname": platform.node(),
        "load_avg": os.getloadavg(),
    }


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "httpx": httpx.__version__, "torch_threads": torch.get_num_threads()}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


# ---- statistics ------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rounded(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if x == x else x  # noqa: PLR0124 - NaN stays NaN


# ---- adapters --------------------------------------------------------------------------------------


def base_shape(model: str | None) -> ModelShape:
    """The base model's shape, read from its config (no weights loaded)."""
    cfg = base_config(model)
    return ModelShape(cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers)


def base_config(model: str | None):  # noqa: ANN201 - a transformers PretrainedConfig
    """The base model's transformers config (no weights loaded)."""
    from transformers import AutoConfig

    from server.model import converted_gguf_dir, default_gguf_path

    if model is None:
        source = converted_gguf_dir(default_gguf_path())
    elif model.endswith(".gguf"):
        source = converted_gguf_dir(Path(model))
    else:
        source = model
    return AutoConfig.from_pretrained(str(source))


def random_tensors(kind: str, rank: int, d: int, gen: torch.Generator, weight_scale: float = 1.0,
                   bias_scale: float = 1.0, proj_bias: bool = False) -> dict[str, torch.Tensor]:
    """One intervention's native tensors, drawn from `gen` in float64 and stored in float32.

    R has orthonormal columns (QR); the rows of W (and of the projection) have norm ~weight_scale, so
    W h is of the order of R h; b ~ N(0, bias_scale²). The draws come in a fixed order (b, R, W,
    projection), so one seed gives one adapter whatever the caller.
    """

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float()

    t = {"bias": randn(rank) * bias_scale}
    if kind in ("loreft", "consreft", "lobireft", "direft"):
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
        t["rotate_layer"] = q.float().contiguous()
    if kind in ("loreft", "direft", "noreft", "nodireft"):
        t["weight"] = randn(rank, d) * (weight_scale / d**0.5)
    if kind in ("noreft", "nodireft"):
        t["proj_weight"] = randn(rank, d) / d**0.5
        if proj_bias:
            t["proj_bias"] = randn(rank)
    return t


def random_adapter(shape: ModelShape, specs: Sequence[tuple[str, int, int]], positions: str = "f2+l2",
                   share_weights: bool = True, seed: int = 0, weight_scale: float = 1.0, bias_scale: float = 1.0,
                   proj_bias: bool = False, max_rank: int = 64) -> adapter_file.Adapter:
    """A validated float32 adapter with random weights; `specs` is (type, layer, rank) per intervention,
    in adapter order. The one random-adapter builder of the benchmarks, load tests and tests."""
    gen = torch.Generator().manual_seed(seed)
    ivs = [
        adapter_file.make_intervention(
            i, kind, layer, rank,
            random_tensors(kind, rank, shape.hidden_size, gen, weight_scale, bias_scale, proj_bias),
            shape, max_rank, "float32",
        )
        for i, (kind, layer, rank) in enumerate(specs)
    ]
    return adapter_file.build(ivs, Positions.parse(positions), share_weights, shape, "float32")


def random_loreft(
    shape: ModelShape, seed: int, rank: int = 4, layers: Sequence[int] = (4, 10, 20), positions: str = "f2+l2",
    share_weights: bool = True, weight_scale: float = 1.0, bias_scale: float = 2.0,
) -> adapter_file.Adapter:
    """LoReFT on `layers` (those the model has; layer 0 if none), strong enough to change outputs:
    the edit Rᵀ(W h + b − R h) moves the hidden state by about its own size within the rank-r subspace."""
    layers = [layer for layer in layers if layer < shape.num_layers] or [0]
    return random_adapter(shape, [("loreft", layer, rank) for layer in layers], positions, share_weights, seed,
                          weight_scale, bias_scale)


def write_adapters(directory: Path, shape: ModelShape, names: Sequence[str], seed0: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (directory / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(random_loreft(shape, seed0 + i)))


def random_prompts(n: int, length: int, seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


# ---- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(overrides: dict[str, str]) -> dict[str, str]:
    """The caller's environment without REFT_* settings (so they cannot skew a run), plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFT_") or k == "REFT_CACHE_DIR"}
    env.update(overrides)
    return env


SECRET_FLAGS = ("--api-key", "--admin-key")


def _redacted(command: list[str]) -> list[str]:
    """The command line as the log shows it: the value after a key flag is never written (the log is read by
    tests that check no key leaks, and by people)."""
    return ["***" if i and command[i - 1] in SECRET_FLAGS else arg for i, arg in enumerate(command)]


class ServerProcess:
    """`reft-serve serve` as a subprocess on a free port, its stdout and stderr appended to `log_path`.

    The one server harness of the benchmarks, load_tests/ and tests/ (whose conftest's `ReftServer`
    adds the suite's settings). It lives here rather than in tests/ because the benchmarks and load
    tests are scripts that must run without the test suite, while tests/ already import the tools
    (`bench.common`, `load_tests`: the repository root is on pytest's path); nothing under server/
    imports it, so the layers still point one way. The port is chosen once, so a stopped and
    restarted server keeps its URL; `statuses` and `health_bodies` record the /health answers seen
    while waiting for readiness (the first three JSON ones, and the 200).
    """

    def __init__(self, registry: Path, log_path: Path, model: str | None = None,
                 env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.registry, self.log_path, self.model = Path(registry), Path(log_path), model
        self.env, self.args = server_env(env or {}), list(args)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.statuses: list[int] = []
        self.health_bodies: list[tuple[int, dict, dict]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = VENV_BIN / "reft-serve"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
        cmd += ["serve", "--adapters", str(self.registry), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.model:
            cmd += ["--model", self.model]
        return cmd + self.args

    def start(self, timeout: float = 900.0) -> float:
        """Start the process and wait for /health 200; the seconds that took."""
        self.statuses, self.health_bodies = [], []
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {time.strftime('%H:%M:%S')} {' '.join(_redacted(self.command()))}\n".encode())
            log.flush()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
                try:
                    r = client.get(self.url + "/health")
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                self.statuses.append(r.status_code)
                json_body = "json" in r.headers.get("content-type", "")
                if json_body and (len(self.health_bodies) < 3 or r.status_code == 200):
                    self.health_bodies.append((r.status_code, dict(r.headers), r.json()))
                if r.status_code == 200:
                    return time.perf_counter() - t0
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: in-flight requests drain (up to the server's drain period), then it exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no clean-up runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def peak_rss(self) -> int:
        """The server's peak resident set size so far (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def log(self) -> str:
        """Everything the server (every start of it) has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class BaselineWorker:
    """bench/baselines.py as a subprocess that answers one JSON line per command."""

    def __init__(self, log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "baselines.py")], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)

    def send(self, msg: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"baseline worker exited ({self.proc.poll()}); see its log")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"baseline worker failed: {reply.get('error')}")
        return reply

    def ask(self, msg: dict) -> dict:
        self.send(msg)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "quit"})
                self.proc.wait(timeout=30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


# ---- HTTP load --------------------------------------------------------------------------------------


@dataclass
class Completion:
    latency: float
    tokens: int
    text: str = ""


class Load:
    """Blocking HTTP clients on a thread pool: one connection per concurrent request, kept alive."""

    def __init__(self, url: str, concurrency: int = 64) -> None:
        self.client = httpx.Client(base_url=url, timeout=httpx.Timeout(1800.0, connect=30.0),
                                   limits=httpx.Limits(max_connections=concurrency,
                                                       max_keepalive_connections=concurrency))
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()

    def complete(self, model: str, prompt: list[int], max_tokens: int) -> Completion:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        r = self.client.post("/v1/completions", json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/completions ({model}) -> {r.status_code}: {r.text[:300]}")
        data = r.json()
        tokens = int(data["usage"]["completion_tokens"])
        if tokens != max_tokens:
            raise RuntimeError(f"{model}: expected {max_tokens} tokens, got {tokens} "
                               f"(finish_reason {data['choices'][0].get('finish_reason')})")
        return Completion(latency, tokens, data["choices"][0]["text"])

    def concurrent(self, models: Sequence[str], prompts: Sequence[list[int]], max_tokens: int) -> dict:
        """All requests at once; throughput = generated tokens / wall time from first send to last reply."""
        t0 = time.perf_counter()
        futures = [self.pool.submit(self.complete, m, p, max_tokens) for m, p in zip(models, prompts, strict=True)]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        tokens = sum(r.tokens for r in results)
        return {"seconds": wall, "tokens": tokens, "tok_s": tokens / wall,
                "median_latency": median([r.latency for r in results])}

    def token_times(self, prompt: list[int], max_tokens: int, stop: threading.Event | None = None,
                    times: list[float] | None = None, extra: dict | None = None) -> list[float]:
        """Stream one base-model request (/generate); the arrival time of each token, appended to `times`
        as it comes (so another thread can watch). Stops reading (and so cancels the request) once `stop`
        is set. `extra` adds to (or overrides) the request's fields."""
        body = {"prompt": prompt, "max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                **(extra or {})}
        times = [] if times is None else times
        with self.client.stream("POST", "/generate", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"POST /generate (stream) -> {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if stop is not None and stop.is_set():
                    break
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(f"stream failed: {event['error']}")
                now = time.perf_counter()
                times.extend(now for _ in event["token_ids"])
        return times

    def sequential(self, models: Sequence[str], prompts: Sequence[list[int]], max_tokens: int) -> dict:
        t0 = time.perf_counter()
        results = [self.complete(m, p, max_tokens) for m, p in zip(models, prompts, strict=True)]
        wall = time.perf_counter() - t0
        tokens = sum(r.tokens for r in results)
        return {"seconds": wall, "tokens": tokens, "tok_s": tokens / wall,
                "median_latency": median([r.latency for r in results])}
