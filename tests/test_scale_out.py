"""Scale-out (issue 13): the model-server protocol as the llm-d router reads it, vLLM's runtime
adapter endpoints, the read-only registry, and `make serve` leaving every REFT_* variable alone."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import adapter_file
from server.config import Settings
from tests.conftest import REPO, error_of
from tests.test_registry import EMOJI_DIR, GENS, emoji, emoji_bytes, variant

pytestmark = pytest.mark.timeout(600)
ADMIN = "admin-" + "k" * 24


# ---- the router's reading of /metrics -----------------------------------------------------------


def router_view(text: str) -> dict:
    """What the llm-d router's core metrics extractor (vllm engine type) takes from one scrape.

    Gauges: of a family's series, the one with the latest timestamp (none carry one here, so the
    first). vllm:lora_requests_info: the series with the highest value (vLLM stamps each label
    combination with its creation time), its running/waiting labels split at commas, blanks
    dropped, max_lora as an integer.
    """
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def latest(name: str) -> float:
        best, stamp = None, -1.0
        for sample in families[name].samples:
            if (sample.timestamp or 0) > stamp:
                best, stamp = sample, sample.timestamp or 0
        return best.value

    lora, value = None, -1.0
    for sample in families["vllm:lora_requests_info"].samples:
        if sample.value > value:
            lora, value = sample, sample.value
    names = lambda csv: {n.strip() for n in csv.split(",") if n.strip()}  # noqa: E731
    return {
        "waiting": int(latest("vllm:num_requests_waiting")),
        "running": int(latest("vllm:num_requests_running")),
        "kv": latest("vllm:kv_cache_usage_perc"),
        "active": names(lora.labels["running_lora_adapters"]),
        "queued": names(lora.labels["waiting_lora_adapters"]),
        "max_lora": int(lora.labels["max_lora"]),
        "lora_changed": value,
    }


def scrape(url: str) -> dict:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return router_view(r.text)


@pytest.fixture(scope="module")
def ro_server(tmp_path_factory, reft_server_factory):
    """A read-only replica (runtime updates off) of a registry holding a, b and c; one batch row."""
    root = tmp_path_factory.mktemp("ro")
    registry = root / "adapters"
    registry.mkdir()
    for i, name in enumerate("abc"):
        (registry / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(variant(emoji(), i / 5)))
    env = {"REFT_MAX_BATCH_SIZE": "1", "REFT_SCAN_INTERVAL": "0.5"}
    return reft_server_factory(registry, root / "server.log", env, args=["--read-only-registry"])


def completion(name: str, tokens: int = 1, **extra) -> dict:
    return {"model": name, "prompt": GENS[0]["prompt_ids"], "max_tokens": tokens, "temperature": 0, **extra}


def test_metrics_as_the_router_reads_them(ro_server):
    url = ro_server.url
    idle = scrape(url)
    assert idle == {"waiting": 0, "running": 0, "kv": 0.0, "active": set(), "queued": set(), "max_lora": 1,
                    "lora_changed": idle["lora_changed"]}
    time.sleep(0.3)
    assert scrape(url)["lora_changed"] == idle["lora_changed"]  # the time of the last change, not of the scrape
    before = time.time()
    blocker = completion("a", 256, ignore_eos=True, stream=True)
    with httpx.Client(base_url=url, timeout=120) as own, ThreadPoolExecutor(3) as pool:
        with own.stream("POST", "/v1/completions", json=blocker) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, which cancels "a"
            next(line for line in lines if line.startswith("data:"))  # "a" holds the one row
            queued = [pool.submit(httpx.post, url + "/v1/completions", json=completion(n), timeout=120)
                      for n in ("b", "c", "b")]
            deadline = time.monotonic() + 30
            while scrape(url)["waiting"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = scrape(url)
            assert (busy["running"], busy["waiting"]) == (1, 3)
            assert 0 < busy["kv"] <= 1
            assert busy["active"] == {"a"} and busy["queued"] == {"b", "c"} and busy["max_lora"] == 1
            assert before <= busy["lora_changed"] <= time.time()
        assert all(f.result().status_code == 200 for f in queued)
    deadline = time.monotonic() + 30
    while scrape(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = scrape(url)
    assert (after["running"], after["waiting"], after["kv"], after["active"], after["queued"]) == (0, 0, 0.0, set(),
                                                                                                   set())
    assert after["lora_changed"] >= busy["lora_changed"]


def test_read_only_registry_serves_and_refuses_writes(ro_server):
    url = ro_server.url
    assert httpx.post(url + "/v1/completions", json=completion("c"), timeout=120).status_code == 200
    r = httpx.post(url + "/v1/adapters", data={"name": "new"}, files={"file": ("new.safetensors", emoji_bytes())})
    assert "read-only" in error_of(r, 403) and r.json()["error"]["type"] == "permission_error"
    assert "read-only" in error_of(httpx.delete(url + "/v1/adapters/a"), 403)
    assert httpx.get(url + "/v1/adapters/a").status_code == 200


def test_runtime_endpoints_are_off_unless_enabled(ro_server):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        assert "REFT_ALLOW_RUNTIME_ADAPTER_UPDATES" in error_of(httpx.post(ro_server.url + path, json=body), 404)


# ---- vLLM's runtime adapter endpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def rt(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("rt")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "native.safetensors").write_bytes(emoji_bytes())
    (allowed / "other.safetensors").write_bytes(adapter_file.to_bytes(variant(emoji(), 1.0)))
    (allowed / "junk.safetensors").write_bytes(b"not an adapter")
    shutil.copytree(EMOJI_DIR, allowed / "pyreft-emoji")
    (root / "outside.safetensors").write_bytes(emoji_bytes())
    (allowed / "link.safetensors").symlink_to(root / "outside.safetensors")
    env = {"REFT_ALLOW_RUNTIME_ADAPTER_UPDATES": "1", "REFT_RUNTIME_ADAPTER_ROOT": str(allowed),
           "REFT_ADMIN_KEY": ADMIN}
    server = reft_server_factory(root / "adapters", root / "server.log", env)
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c, allowed, root


def test_load_and_unload_lora_adapter(rt):
    client, allowed, _ = rt
    body = {"lora_name": "native", "lora_path": str(allowed / "native.safetensors")}
    r = client.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'native' added successfully."
    assert client.get("/v1/adapters/native").json()["version"] == 1
    done = client.post("/v1/completions", json=completion("native", len(GENS[0]["completion_ids"])))
    assert done.json()["choices"][0]["text"] == GENS[0]["completion"]
    # already loaded: vLLM's 400, unless load_inplace
    again = {"lora_name": "native", "lora_path": "other.safetensors"}  # relative paths start at the root
    assert "already been loaded" in error_of(client.post("/v1/load_lora_adapter", json=again), 400)
    assert client.post("/v1/load_lora_adapter", json={**again, "load_inplace": True}).status_code == 200
    assert client.get("/v1/adapters/native").json()["version"] == 2
    # a pyreft save directory, with the positions pyreft does not record
    body = {"lora_name": "from-pyreft", "lora_path": "pyreft-emoji"}
    assert "positions" in error_of(client.post("/v1/load_lora_adapter", json=body), 400)
    r = client.post("/v1/load_lora_adapter", json={**body, "positions": "f2+l2", "share_weights": True})
    assert r.status_code == 200, r.text
    done = client.post("/v1/completions", json=completion("from-pyreft", len(GENS[0]["completion_ids"])))
    assert done.json()["choices"][0]["text"] == GENS[0]["completion"]
    # unload: 200, then the adapter is gone; unknown names are vLLM's 404
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "from-pyreft"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'from-pyreft' removed successfully."
    error_of(client.post("/v1/completions", json=completion("from-pyreft")), 404)
    assert "cannot be found" in error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "from-pyreft"}), 404)


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"lora_path": "native.safetensors"}, 400, "both"),
    ({"lora_name": "x"}, 400, "both"),
    ({"lora_name": "bad/name", "lora_path": "native.safetensors"}, 400, "invalid"),
    ({"lora_name": "x", "lora_path": "../outside.safetensors"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "/etc/passwd"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "link.safetensors"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "missing.safetensors"}, 404, "no adapter found"),
    ({"lora_name": "x", "lora_path": "junk.safetensors"}, 400, "invalid adapter"),
    ({"lora_name": "x", "lora_path": 7}, 422, ""),
])
def test_load_lora_adapter_refusals(rt, body, status, words):
    client, _, _ = rt
    assert words in error_of(client.post("/v1/load_lora_adapter", json=body), status)
    assert client.get("/v1/adapters/x").status_code == 404


def test_runtime_endpoints_need_the_admin_key(rt):
    client, _, _ = rt
    body = {"lora_name": "x", "lora_path": "native.safetensors"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error_of(httpx.post(f"{client.base_url}/v1/load_lora_adapter", json=body, headers=headers), 401, 403)
        error_of(httpx.post(f"{client.base_url}/v1/unload_lora_adapter", json={"lora_name": "native"},
                            headers=headers), 401, 403)
    error_of(client.post("/v1/unload_lora_adapter", json={}), 400)


# ---- make serve and the CLI leave every REFT_* variable alone -----------------------------------


def test_make_serve_passes_no_flag_that_overrides_an_environment_twin():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, "REFT_PORT": "9123"}
    out = subprocess.run(["make", "-s", "-n", "-o", "install", "serve"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    assert len(out) == 1 and shlex.split(out[0]) == [".venv/bin/reft-serve", "serve"], out
    out = subprocess.run(["make", "-s", "-n", "-o", "install", "serve", "SERVE_ARGS=--port 9000"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == [".venv/bin/reft-serve", "serve", "--port", "9000"]


def test_cli_defaults_are_the_settings_defaults_and_env_reaches_settings(monkeypatch):
    from types import SimpleNamespace

    import typer.main

    from server import cli

    command = typer.main.get_command(cli.app).commands["serve"]
    for param in command.params:
        assert param.default == Settings.model_fields[param.name].default, param.name
        assert param.envvar == "REFT_" + param.name.upper(), param.name
    seen = {}
    app = SimpleNamespace(state=SimpleNamespace(reft=SimpleNamespace(drain=lambda: None)))
    monkeypatch.setattr(cli, "_run", lambda app, settings, drain: seen.update(port=settings.port, host=settings.host))
    monkeypatch.setattr("server.api.app.create_app", lambda settings: seen.setdefault("settings", settings) and app)
    env = {"REFT_PORT": "9123", "REFT_HOST": "127.0.0.2", "REFT_READ_ONLY_REGISTRY": "1", "REFT_SCAN_INTERVAL": "7",
           "REFT_ALLOW_RUNTIME_ADAPTER_UPDATES": "true", "REFT_MAX_BATCH_SIZE": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["serve"])
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (seen["port"], seen["host"]) == (9123, "127.0.0.2")
    assert settings.read_only_registry and settings.allow_runtime_adapter_updates
    assert (settings.scan_interval, settings.max_batch_size) == (7.0, 3)
