"""Shared fixtures: a real `reft-serve serve` subprocess for the HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
REFT_SERVE = Path(sys.executable).with_name("reft-serve")
EMOJI_DIR = Path(__file__).parent / "data" / "pyreft-emoji"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ReftServer:
    """One `reft-serve serve` process on a free port; its stderr goes to `log_path`.

    Runs on the CPU in float32 (pyreft's fixture outputs were made so) unless REFT_TEST_DEVICE
    says otherwise. `statuses` records every /health status seen while waiting for readiness.
    """

    def __init__(self, registry: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.registry, self.log_path = Path(registry), Path(log_path)
        self.extra_env, self.args = dict(env or {}), list(args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.statuses: list[int] = []
        self.health_bodies: list[tuple[int, dict, dict]] = []

    def start(self, timeout: float = 180.0) -> ReftServer:
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("REFT_")}
        env.update({"REFT_DEVICE": os.environ.get("REFT_TEST_DEVICE", "cpu"), "REFT_DTYPE": "float32",
                    "REFT_LOG_LEVEL": "info"})
        if os.environ.get("REFT_CACHE_DIR"):
            env["REFT_CACHE_DIR"] = os.environ["REFT_CACHE_DIR"]
        env.update(self.extra_env)
        self.statuses, self.health_bodies = [], []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(REFT_SERVE), "serve", "--adapters", str(self.registry), "--port", str(self.port), *self.args],
                env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"reft-serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                try:
                    r = client.get(self.url + "/health")
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                self.statuses.append(r.status_code)
                if len(self.health_bodies) < 3 or r.status_code == 200:
                    self.health_bodies.append((r.status_code, dict(r.headers), r.json()))
                if r.status_code == 200:
                    return self
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"reft-serve was not ready within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    """The real pyreft save directory of the emoji adapter, with expected.json beside it."""
    return EMOJI_DIR


@pytest.fixture(scope="session")
def reft_server_factory():
    """Start `ReftServer`s; every one still running at the end of the session is stopped."""
    started: list[ReftServer] = []

    def make(registry: Path, log_path: Path, env: dict[str, str] | None = None,
             args: list[str] | None = None, start: bool = True) -> ReftServer:
        server = ReftServer(registry, log_path, env, args)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's `server` fixture."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def error_of(r: httpx.Response, *statuses: int) -> str:
    """Assert the status and the error shape {"error": {"message", "type", "code"}}; return the message."""
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    e = body["error"]
    assert isinstance(e["message"], str) and e["message"], body
    assert isinstance(e["type"], str) and e["type"], body
    assert isinstance(e["code"], (int, str)) and not isinstance(e["code"], bool), body
    return e["message"]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll `predicate` until it returns something true (returned), or `timeout` seconds pass (then its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
