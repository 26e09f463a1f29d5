"""Shared fixtures: a real `reft-serve serve` subprocess for the HTTP tests, and the guard on `slow`.

`make test-fast` runs `pytest -m "not slow"`: every test that starts a server or loads the base model
must carry the `slow` marker. A test that uses `reft_server_factory` (itself or through a fixture) is
marked here at collection; the others say it in their module (`pytestmark`) or on the test.
`pytest_runtest_protocol` below remembers which test is running, and `ReftServer.start` and the base
model's loader refuse to run inside a test without the marker, in every session, so a missing mark
fails the test that lacks it instead of slowing the fast loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from bench.common import ServerProcess
from server import model as server_model

REPO = Path(__file__).resolve().parent.parent
EMOJI_DIR = Path(__file__).parent / "data" / "pyreft-emoji"

_running: pytest.Item | None = None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "reft_server_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201 - a hook wrapper
    global _running
    _running = item
    try:
        yield
    finally:
        _running = None


def require_slow(what: str) -> None:
    """Fail unless the running test is marked `slow`: outside a test (collection) nothing heavy runs."""
    if _running is None or _running.get_closest_marker("slow") is None:
        where = _running.nodeid if _running is not None else "collection"
        pytest.fail(f"{where} {what} but is not marked slow: add `pytestmark = pytest.mark.slow` to its "
                    "module (or @pytest.mark.slow to the test) so that `make test-fast` leaves it out", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    # Every use of the base model's GGUF (loading it, dequantising it, its tokenizer) hashes the file
    # first, through this module-level name: the one place that sees them all.
    hash_gguf = server_model.file_sha256

    def guarded(path: Path, *args, **kwargs) -> str:
        require_slow(f"opens the base model ({Path(path).name})")
        return hash_gguf(path, *args, **kwargs)

    server_model.file_sha256 = guarded
    config.add_cleanup(lambda: setattr(server_model, "file_sha256", hash_gguf))


class ReftServer(ServerProcess):
    """`bench.common.ServerProcess` with the suite's settings: on the CPU in float32 (pyreft's fixture
    outputs were made so) unless REFT_TEST_DEVICE says otherwise, logging at info; `start` refuses to
    run in a test not marked `slow`."""

    def __init__(self, registry: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        # No lone-row compile: it would add 10-60 s to every server start here; test_compile_single.py tests it.
        defaults = {"REFT_DEVICE": os.environ.get("REFT_TEST_DEVICE", "cpu"), "REFT_DTYPE": "float32",
                    "REFT_LOG_LEVEL": "info", "REFT_COMPILE_SINGLE": "0"}
        super().__init__(registry, log_path, env={**defaults, **(env or {})}, args=args or ())

    def start(self, timeout: float = 180.0) -> float:
        require_slow("starts a server")
        return super().start(timeout)


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
        if start:
            server.start()
        return server

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


# Logprobs of two float32 forwards whose products sum in different orders (the server's oneDNN and split
# products against a reference forward's MKL ones) differ by up to about 1e-4 on the default model; a wrong
# position, row or adapter moves them by 1e-2 and more.
LOGPROB_ABS = 2e-4


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll `predicate` until it returns something true (returned), or `timeout` seconds pass (then its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
