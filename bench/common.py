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


def random_loreft(
    shape: ModelShape, seed: int, rank: int = 4, layers: Sequence[int] = (4, 10, 20), positions: str = "f2+l2",
    share_weights: bool = True, weight_scale: float = 1.0, bias_scale: float = 2.0,
) -> adapter_file.Adapter:
    """A LoReFT adapter with a random orthonormal R (QR) and weights large enough to change outputs.

    W rows have norm ~weight_scale, so W h is of the order of R h and the edit Rᵀ(W h + b − R h)
    moves the hidden state by about its own size within the rank-r subspace.
    """
    gen = torch.Generator().manual_seed(seed)
    d = shape.hidden_size
    layers = [layer for layer in layers if layer < shape.num_layers] or [0]
    ivs = []
    for i, layer in enumerate(layers):
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
        tensors = {
            "rotate_layer": q.float().contiguous(),
            "weight": (torch.randn(rank, d, generator=gen) * (weight_scale / d**0.5)).contiguous(),
            "bias": torch.randn(rank, generator=gen) * bias_scale,
        }
        ivs.append(adapter_file.make_intervention(i, "loreft", layer, rank, tensors, shape, 64, "float32"))
    return adapter_file.build(ivs, Positions.parse(positions), share_weights, shape, "float32")


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


class ServerProcess:
    """`reft-serve serve` as a subprocess on a free port; `start()` returns seconds until /health is 200."""

    def __init__(self, adapters: Path, log_path: Path, model: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.adapters, self.log_path, self.model = adapters, log_path, model
        self.env = server_env(env or {})
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = VENV_BIN / "reft-serve"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
        cmd += ["serve", "--adapters", str(self.adapters), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.model:
            cmd += ["--model", self.model]
        return cmd

    def start(self, timeout: float = 900.0) -> float:
        self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n==== start {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
        self._log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def peak_rss(self) -> int:
        """The server's peak resident set size so far (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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
