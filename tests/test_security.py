"""Secure defaults: who may call what, decided from the headers before any body is read.

In-process tests drive the ASGI app directly (no model is loaded: the gate answers before
readiness matters), so they can bind "0.0.0.0" without listening anywhere and can prove that
`receive()` is never awaited. One real server, started with an admin key and its own TMPDIR,
shows that an anonymous 64 MiB upload is refused without a byte reaching the temp directory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import ROUTERS, create_app
from server.api.dependencies import ADMIN_DISABLED, Access, is_loopback, route_access
from server.config import Settings
from server.metrics import Metrics
from tests.conftest import REPO, error_of

ADMIN = "sk-admin-test"
USER = "sk-user-test"
METRICS = "sk-metrics-test"
UPLOAD_BYTES = 64 * 1024 * 1024


def never_loaded(settings: Settings):
    raise AssertionError("the in-process tests never run the lifespan")


def asgi_client(**settings) -> httpx.AsyncClient:
    app = create_app(Settings(**settings), engine_factory=never_loaded)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(coro)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


FILES = {"file": ("a.safetensors", b"\x00" * 1024, "application/octet-stream")}


async def admin_calls(c: httpx.AsyncClient, headers: dict) -> list[httpx.Response]:
    return [await c.post("/v1/adapters", data={"name": "x"}, files=FILES, headers=headers),
            await c.delete("/v1/adapters/emoji", headers=headers)]


# ---- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("LocalHost", True), ("0.0.0.0", False),
                                           ("::", False), ("10.0.0.1", False), ("example.com", False), ("", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_every_changing_route_needs_admin_and_every_v1_route_a_key():
    """Adapter changes (and any route added later under /v1/adapters or vLLM's load/unload) declare require_admin."""
    app = create_app(Settings(), engine_factory=never_loaded)
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    # every path the app serves is one the gate knows (a router left out of ROUTERS would go unchecked)
    assert set(app.openapi()["paths"]) == {r.path for r in routes}
    changing = [r for r in routes if (r.path.startswith("/v1/adapters") and r.methods - {"GET", "HEAD"})
                or "lora_adapter" in r.path]
    assert {(r.path, m) for r in changing for m in r.methods} >= {("/v1/adapters", "POST"),
                                                                  ("/v1/adapters/{name}", "DELETE")}
    assert all(route_access(r) is Access.ADMIN for r in changing)
    for r in routes:
        if r.path.startswith("/v1") or r.path == "/generate":
            assert route_access(r) >= Access.API, r.path
    assert route_access(next(r for r in routes if r.path == "/metrics")) is Access.METRICS
    assert route_access(next(r for r in routes if r.path == "/health")) is Access.OPEN


def test_network_bind_without_admin_key_refuses_adapter_changes_with_403():
    async def go():
        async with asgi_client(host="0.0.0.0") as c:
            for r in await admin_calls(c, {}):
                assert error_of(r, 403) == ADMIN_DISABLED
                assert "REFT_ADMIN_KEY" in ADMIN_DISABLED and "127.0.0.1" in ADMIN_DISABLED
                assert r.json()["error"]["type"] == "permission_error"
            # reads stay open (here: 503 while loading, not a refusal)
            assert (await c.get("/v1/adapters")).status_code == 503
        async with asgi_client(host="0.0.0.0", api_key=USER) as c:  # an API key never authorises an admin call
            for r in await admin_calls(c, bearer(USER)):
                error_of(r, 403)
            assert (await c.get("/v1/adapters", headers=bearer(USER))).status_code == 503

    run(go())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_bind_without_admin_key_allows_adapter_changes(host):
    async def go():
        async with asgi_client(host=host) as c:
            for r in await admin_calls(c, {}):
                assert r.status_code == 503, r.text  # past the gate: the model is not loaded here
        async with asgi_client(host=host, api_key=USER) as c:
            for r in await admin_calls(c, {}):
                error_of(r, 401)
            for r in await admin_calls(c, bearer(USER)):
                assert r.status_code == 503, r.text

    run(go())


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_with_admin_key_only_the_admin_key_changes_adapters(host):
    async def go():
        async with asgi_client(host=host, admin_key=ADMIN, api_key=USER) as c:
            for headers in ({}, bearer(USER), bearer("wrong"), {"Authorization": f"Basic {ADMIN}"}):
                for r in await admin_calls(c, headers):
                    error_of(r, 401)
                    assert r.headers["www-authenticate"] == "Bearer"
            for r in await admin_calls(c, bearer(ADMIN)):
                assert r.status_code == 503, r.text

    run(go())


def test_metrics_key():
    async def go():
        async with asgi_client(metrics_key=METRICS, admin_key=ADMIN, api_key=USER) as c:
            for headers in ({}, bearer(USER), bearer("wrong")):
                error_of(await c.get("/metrics", headers=headers), 401)
            for key in (METRICS, ADMIN):
                assert (await c.get("/metrics", headers=bearer(key))).status_code == 200
            error_of(await c.get("/v1/models", headers=bearer(METRICS)), 401)  # it opens /metrics only
            assert (await c.get("/health")).status_code == 503  # probes need no key
        async with asgi_client(api_key=USER) as c:
            assert (await c.get("/metrics")).status_code == 200  # open unless a metrics key is set

    run(go())


# ---- before the body ----------------------------------------------------------------------------


async def call_without_body(app, method: str, path: str, headers: dict[str, str]) -> tuple[int, bool]:
    """Call the ASGI app with headers only; `receive` never returns. (status, whether receive was awaited)."""
    awaited = False

    async def receive():
        nonlocal awaited
        awaited = True
        await asyncio.Event().wait()

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent[0]["status"], awaited


@pytest.mark.parametrize("settings,headers,status", [
    ({"host": "0.0.0.0"}, {}, 403),
    ({"admin_key": ADMIN}, {}, 401),
    ({"admin_key": ADMIN, "api_key": USER}, {"Authorization": f"Bearer {USER}"}, 401),
    ({"admin_key": ADMIN}, {"Authorization": f"Bearer {ADMIN}"}, 413),  # authorised, but over the size limit
])
def test_refusals_never_read_the_body(settings, headers, status):
    app = create_app(Settings(**settings), engine_factory=never_loaded)
    headers = {"content-type": "multipart/form-data; boundary=x", "content-length": str(UPLOAD_BYTES + 10**6),
               **headers}
    assert run(call_without_body(app, "POST", "/v1/adapters", headers)) == (status, False)


def test_json_routes_refuse_before_the_body():
    app = create_app(Settings(api_key=USER, max_body_bytes=4096), engine_factory=never_loaded)
    json_headers = {"content-type": "application/json", "content-length": "100"}
    assert run(call_without_body(app, "POST", "/v1/completions", json_headers)) == (401, False)
    big = {**json_headers, "content-length": "5000", "Authorization": f"Bearer {USER}"}
    assert run(call_without_body(app, "POST", "/generate", big)) == (413, False)
    assert run(call_without_body(app, "POST", "/generate", {**big, "content-length": "-1"})) == (413, False)


# ---- the lora info gauge ------------------------------------------------------------------------


def test_lora_info_lists_at_most_the_label_cap():
    metrics = Metrics(max_adapter_labels=5)
    names = [f"a{i:03d}" for i in range(300)]
    metrics.view.running_adapters = lambda: names
    metrics.view.waiting_adapters = lambda: names[::-1]
    from prometheus_client import generate_latest

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    (sample,) = families["vllm:lora_requests_info"].samples
    assert sample.labels["running_lora_adapters"] == ",".join(names[:5])
    assert sample.labels["waiting_lora_adapters"] == ",".join(names[::-1][:5])
    labels = {metrics.adapter_label(n) for n in names}
    assert labels == set(names[:5]) | {"other"}


# ---- a real server ------------------------------------------------------------------------------


def tmp_files(pid: int, tmpdir: Path) -> list[str]:
    """Files under `tmpdir`: listed in it, or open in the server (O_TMPFILE spools have no name)."""
    found = [str(p) for p in tmpdir.rglob("*")]
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(tmpdir)):
            found.append(target)
    return found


class Watcher(threading.Thread):
    """Polls the server's temp directory every few milliseconds and remembers anything it saw."""

    def __init__(self, pid: int, tmpdir: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.tmpdir, self.seen, self.done = pid, tmpdir, set(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen.update(tmp_files(self.pid, self.tmpdir))
            time.sleep(0.002)

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def raw_post(url: str, headers: dict[str, str], body_bytes: int = 0, timeout: float = 10.0) -> tuple[int, float]:
    """Send the headers, read the answer (status, seconds), then try to push `body_bytes` of body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        head = "POST /v1/adapters HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        start = time.monotonic()
        sock.sendall((head + "\r\n").encode())
        answer = sock.recv(65536).decode(errors="replace")
        elapsed = time.monotonic() - start
        chunk = b"\x00" * (1 << 20)
        try:
            for _ in range(body_bytes // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # the server closed the connection: the body was never wanted
    return int(answer.split(" ", 2)[1]), elapsed


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("keyed")
    registry, tmpdir = root / "adapters", root / "tmp"
    registry.mkdir()
    tmpdir.mkdir()
    (registry / "emoji.safetensors").write_bytes((REPO / "adapters" / "emoji.safetensors").read_bytes())
    server = reft_server_factory(registry, root / "server.log", {"REFT_ADMIN_KEY": ADMIN, "TMPDIR": str(tmpdir),
                                                                 "REFT_SCAN_INTERVAL": "0"})
    server.tmpdir = tmpdir
    yield server
    server.stop()


def test_anonymous_64mib_upload_writes_nothing_and_is_answered_without_the_body(keyed):
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(UPLOAD_BYTES)}
    with Watcher(keyed.proc.pid, keyed.tmpdir) as watcher:
        status, seconds = raw_post(keyed.url, headers, body_bytes=UPLOAD_BYTES)
        for key in ("wrong", USER):
            assert raw_post(keyed.url, {**headers, "Authorization": f"Bearer {key}"})[0] == 401
        status_big, _ = raw_post(keyed.url, {**headers, "Content-Length": str(2 * UPLOAD_BYTES),
                                             "Authorization": f"Bearer {ADMIN}"})
    assert status == 401 and seconds < 5, (status, seconds)
    assert status_big == 413
    assert not watcher.seen, watcher.seen
    assert "emoji" in httpx.get(keyed.url + "/v1/models").text  # and the server is fine


def test_authorised_upload_does_spool_to_the_watched_directory(keyed):
    """The watcher can fail: an authorised multi-megabyte upload is spooled where it looks."""
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nspooled\r\n--xyz\r\n" \
           b"Content-Disposition: form-data; name=\"file\"; filename=\"a.safetensors\"\r\n\r\n" \
           + b"\x00" * (8 << 20) + b"\r\n--xyz--\r\n"

    def slowly():
        for i in range(0, len(body), 1 << 20):
            time.sleep(0.05)
            yield body[i:i + (1 << 20)]

    with Watcher(keyed.proc.pid, keyed.tmpdir) as watcher:
        r = httpx.post(keyed.url + "/v1/adapters", content=slowly(), timeout=60,
                       headers={"Content-Type": "multipart/form-data; boundary=xyz", **bearer(ADMIN)})
    assert "invalid adapter" in error_of(r, 400)
    assert watcher.seen


def test_draining_refuses_new_requests_before_the_body():
    app = create_app(Settings(), engine_factory=never_loaded)
    app.state.reft.drain()
    headers = {"content-type": "application/json", "content-length": "100"}
    assert run(call_without_body(app, "POST", "/v1/completions", headers)) == (503, False)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            r = await c.get("/v1/adapters")
            assert "shutting down" in error_of(r, 503) and r.headers["connection"] == "close"
            assert (await c.get("/live")).status_code == 200

    run(go())
