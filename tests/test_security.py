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
from server.api.dependencies import ADMIN_DISABLED, Access, host_allowed, is_loopback, origin_allowed, route_access
from server.config import Settings
from server.engine.loop import EngineStats
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
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


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
    metrics.view.engine = lambda: EngineStats(running_adapters=tuple(names), waiting_adapters=tuple(names[::-1]))
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


def raw_post(url: str, headers: dict[str, str], body_bytes: int = 0, timeout: float = 10.0,
             path: str = "/v1/adapters") -> tuple[int, float]:
    """Send the headers (Host: the server's address unless given), read the answer (status, seconds), then try
    to push `body_bytes` of body."""
    host, port = url.removeprefix("http://").split(":")
    headers = {"Host": f"{host}:{port}", **headers}
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
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


def server_dirs(root: Path) -> tuple[Path, Path]:
    """A server's registry and its own temp directory (watched for spooled bodies), both empty."""
    registry, tmpdir = root / "adapters", root / "tmp"
    registry.mkdir()
    tmpdir.mkdir()
    return registry, tmpdir


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("keyed")
    registry, tmpdir = server_dirs(root)
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
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            r = await c.get("/v1/adapters")
            assert "shutting down" in error_of(r, 503) and r.headers["connection"] == "close"
            assert (await c.get("/live")).status_code == 200

    run(go())


# ---- browsers: Host and Origin --------------------------------------------------------------------

EVIL = "evil.example"


@pytest.mark.parametrize("bind,allowed,host,ok", [
    ("127.0.0.1", None, "localhost:8000", True), ("127.0.0.1", None, "127.0.0.1:8000", True),
    ("127.0.0.1", None, "[::1]:8000", True), ("127.0.0.1", None, "LOCALHOST", True),
    ("127.0.0.1", None, "10.1.2.3:8000", True), ("127.0.0.1", None, "", True),
    ("127.0.0.1", None, f"{EVIL}:8000", False), ("127.0.0.1", None, "localhost.evil.example", False),
    ("127.0.0.1", None, "[::1", False),
    ("127.0.0.1", ["reft.example"], "REFT.example:9000", True), ("127.0.0.1", ["reft.example"], EVIL, False),
    ("127.0.0.1", ["*.reft.example"], "a.reft.example", True), ("127.0.0.1", ["*.reft.example"], "reftexample", False),
    ("127.0.0.1", ["*"], EVIL, True),
    ("0.0.0.0", None, "reft-serve.default.svc:8000", True),  # a network bind answers to any name by default
    ("0.0.0.0", ["reft.example"], "reft-serve.default.svc", False),
    ("0.0.0.0", ["reft.example"], "10.244.1.7:8000", True),  # a kubelet probe or a scrape: the pod's IP
])
def test_host_policy(bind, allowed, host, ok):
    assert host_allowed(host, Settings(host=bind, allowed_hosts=allowed)) is ok


@pytest.mark.parametrize("allowed,origin,host,ok", [
    (None, "http://localhost:8000", "localhost:8000", True),  # the server's own page (/ui)
    (None, "https://reft.example", "reft.example", True),  # its page behind a TLS-terminating proxy
    (None, "http://localhost:8001", "localhost:8000", False), (None, f"http://{EVIL}", "localhost:8000", False),
    (None, "null", "localhost:8000", False), (None, "http://localhost:8000", "", False),
    (None, "ftp://localhost:8000", "localhost:8000", False),
    (["http://trusted.example"], "http://TRUSTED.example/", "localhost:8000", True),
    (["http://trusted.example"], "https://trusted.example", "localhost:8000", False),
    (["*"], f"http://{EVIL}", "localhost:8000", True),
])
def test_origin_policy(allowed, origin, host, ok):
    assert origin_allowed(origin, host, Settings(allowed_origins=allowed)) is ok


def test_allowed_hosts_and_origins_from_the_environment(monkeypatch):
    monkeypatch.setenv("REFT_ALLOWED_HOSTS", "reft.example, *.svc.cluster.local")
    monkeypatch.setenv("REFT_ALLOWED_ORIGINS", "http://trusted.example")
    settings = Settings()
    assert settings.allowed_hosts == ["reft.example", "*.svc.cluster.local"]
    assert settings.allowed_origins == ["http://trusted.example"]


def test_foreign_host_is_403_on_every_route_before_the_body():
    async def go():
        async with asgi_client(allowed_hosts=["reft.example"]) as c:
            for method, path in (("GET", "/live"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                                 ("GET", "/docs")):
                r = await c.request(method, path, headers={"Host": f"{EVIL}:8000"})
                message = error_of(r, 403)
                assert "Host" in message and "REFT_ALLOWED_HOSTS" in message and "reft.example" in message, message
                assert r.json()["error"]["type"] == "permission_error"
            assert (await c.get("/live", headers={"Host": "reft.example:8000"})).status_code == 200
            assert (await c.get("/live", headers={"Host": "127.0.0.1:8000"})).status_code == 200

    run(go())
    app = create_app(Settings(), engine_factory=never_loaded)
    headers = {"host": EVIL, "content-type": "application/json", "content-length": "100"}
    assert run(call_without_body(app, "POST", "/v1/completions", headers)) == (403, False)


def test_probes_and_scrapes_pass_on_a_network_bind():
    """The kubelet sends the pod's IP as Host, as do Prometheus and the router's scrapes: allowed on a network
    bind whatever REFT_ALLOWED_HOSTS says."""
    async def go():
        for allowed in (None, ["reft.example"]):
            async with asgi_client(host="0.0.0.0", allowed_hosts=allowed) as c:
                for path in ("/live", "/metrics"):
                    assert (await c.get(path, headers={"Host": "10.244.1.7:8000"})).status_code == 200
                assert (await c.get("/health", headers={"Host": "10.244.1.7:8000"})).status_code == 503  # loading
                r = await c.get("/live", headers={"Host": "reft-serve.default.svc.cluster.local:8000"})
                assert r.status_code == (200 if allowed is None else 403)

    run(go())


@pytest.mark.parametrize("settings", [{}, {"admin_key": ADMIN}])
def test_admin_call_from_a_foreign_origin_is_403_before_the_body(settings):
    app = create_app(Settings(**settings), engine_factory=never_loaded)
    headers = {"host": "127.0.0.1:8000", "origin": f"http://{EVIL}", "authorization": f"Bearer {ADMIN}",
               "content-type": "multipart/form-data; boundary=x", "content-length": str(UPLOAD_BYTES)}
    assert run(call_without_body(app, "POST", "/v1/adapters", headers)) == (403, False)
    assert run(call_without_body(app, "POST", "/v1/adapters", {**headers, "origin": "null"})) == (403, False)


def test_admin_calls_from_this_server_or_no_browser_pass_the_origin_check():
    async def go():
        async with asgi_client(allowed_origins=["http://trusted.example"]) as c:
            for origin in (None, "http://localhost", "http://trusted.example"):
                headers = {"Origin": origin} if origin else {}
                for r in await admin_calls(c, headers):
                    assert r.status_code == 503, (origin, r.text)  # past the gate: the model is not loaded here
            for r in await admin_calls(c, {"Origin": f"http://{EVIL}"}):
                message = error_of(r, 403)
                assert "Origin" in message and EVIL in message and "REFT_ALLOWED_ORIGINS" in message, message
            # a page may send what any other site's page can (it cannot read the answer): only admin calls check it
            assert (await c.get("/v1/models", headers={"Origin": f"http://{EVIL}"})).status_code == 503

    run(go())


@pytest.fixture(scope="module")
def open_loopback(tmp_path_factory, reft_server_factory):
    """No keys, on loopback: every caller is an admin, so the Host and Origin checks are all that stops a page."""
    root = tmp_path_factory.mktemp("open")
    registry, tmpdir = server_dirs(root)
    server = reft_server_factory(registry, root / "server.log", {
        "TMPDIR": str(tmpdir), "REFT_SCAN_INTERVAL": "0", "REFT_ALLOWED_HOSTS": "reft.example",
        "REFT_ALLOWED_ORIGINS": "http://trusted.example"})
    server.tmpdir = tmpdir
    yield server
    server.stop()


def test_real_server_refuses_a_foreign_host(open_loopback):
    port = open_loopback.port
    with httpx.Client(base_url=open_loopback.url, timeout=30) as c:
        for path in ("/v1/models", "/health", "/live"):
            assert "REFT_ALLOWED_HOSTS" in error_of(c.get(path, headers={"Host": f"{EVIL}:{port}"}), 403)
        for host in (f"reft.example:{port}", f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_real_server_refuses_admin_calls_from_a_foreign_origin_without_reading_them(open_loopback):
    url = open_loopback.url
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(UPLOAD_BYTES)}
    with Watcher(open_loopback.proc.pid, open_loopback.tmpdir) as watcher:
        status, seconds = raw_post(url, {**headers, "Origin": f"http://{EVIL}"}, body_bytes=UPLOAD_BYTES)
    assert (status, watcher.seen) == (403, set()) and seconds < 5, (status, seconds, watcher.seen)
    emoji = (REPO / "adapters" / "emoji.safetensors").read_bytes()
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, origin in (("plain", None), ("own", url), ("trusted", "http://trusted.example")):
            r = c.post("/v1/adapters", data={"name": name}, files={"file": ("a.safetensors", emoji)},
                       headers={"Origin": origin} if origin else {})
            assert r.status_code == 201, (origin, r.text)
        error_of(c.delete("/v1/adapters/plain", headers={"Origin": f"http://{EVIL}"}), 403)
        assert c.get("/v1/adapters/plain").status_code == 200
        names = {d["id"] for d in c.get("/v1/models").json()["data"]}
        assert {"plain", "own", "trusted"} <= names
