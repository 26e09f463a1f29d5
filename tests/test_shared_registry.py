"""One registry directory shared by many server processes (issue 13, point 1).

Unit tests run several `Registry` objects on one directory: each opens its own lock file
descriptions, so their `flock`s exclude each other exactly as separate processes' do. The
integration test runs three real servers on one temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server import adapter_file
from server.registry import (
    INDEX_NAME,
    JOURNAL_NAME,
    AdapterExists,
    ReadOnlyRegistry,
    Registry,
    UnknownAdapter,
    read_index,
)
from tests.conftest import error_of
from tests.test_registry import GENS, SHAPE, SlowUpload, emoji, emoji_bytes, neutralised, random_loreft, variant

pytestmark = pytest.mark.timeout(600)


def replica(path: Path, read_only: bool = False) -> Registry:
    reg = Registry(path, SHAPE, max_rank=512, max_adapter_bytes=64 << 20, read_only=read_only)
    reg.open()
    return reg


def versions(reg: Registry) -> dict[str, tuple[int, str]]:
    return {r.name: (r.version, r.sha256) for r in reg.list()}


# ---- several Registry objects on one directory --------------------------------------------------


def test_every_replica_follows_the_others_and_versions_agree(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    a.put("x", emoji(), replace=False)
    assert "x" not in b
    assert b.refresh() == ["x"]
    assert versions(b) == versions(a)
    assert b.put("x", variant(emoji(), 1.0), replace=True).version == 2  # b's put starts from a's v1
    with pytest.raises(AdapterExists):
        a.put("x", emoji(), replace=False)  # a's view was stale; the put checked the shared state
    assert a.get("x").version == 2
    ref = a.resolve("x")
    assert ref.version == 2 and ref.sha256 == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    b.delete("x")
    with pytest.raises(UnknownAdapter):
        a.delete("x")  # already gone: the delete looked at the shared state, not a's memory
    assert versions(a) == versions(b) == {} and read_index(tmp_path) == {}


def test_resolve_sees_an_adapter_uploaded_through_another_replica_at_once(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    a.put("fresh", emoji(), replace=False)
    assert b.cached("fresh") is None
    assert b.resolve("fresh").version == 1  # no scan needed: a miss follows the journal first
    with pytest.raises(UnknownAdapter):
        b.resolve("never")


def test_concurrent_writers_never_lose_or_repeat_a_change(tmp_path):
    regs = [replica(tmp_path) for _ in range(3)]
    base = emoji()

    def work(i: int) -> None:
        reg = regs[i % 3]
        reg.put(f"n{i}", variant(base, i / 10), replace=False)
        reg.put("shared", variant(base, i / 10), replace=True)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, range(24)))
    for reg in regs:
        reg.scan()
    assert versions(regs[0]) == versions(regs[1]) == versions(regs[2])
    assert regs[0].get("shared").version == 24 and len(regs[0]) == 25
    seqs = [json.loads(line)["seq"] for line in (tmp_path / JOURNAL_NAME).read_text().splitlines()]
    assert seqs == list(range(seqs[0], seqs[0] + 48))  # one numbered line per change, none lost
    assert {n: (e["version"], e["sha256"]) for n, e in read_index(tmp_path).items()} == versions(regs[0])


def test_compaction_by_one_replica_is_followed_by_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr("server.registry.shared_index.COMPACT_AFTER", 4)
    a, b = replica(tmp_path), replica(tmp_path)
    a.put("k0", emoji(), replace=False)
    assert b.refresh() == ["k0"]  # b now tails the journal from its end
    for i in range(1, 6):
        a.put(f"k{i}", emoji(), replace=False)  # the 4th change folds the journal into the index
    a.put("k0", variant(emoji(), 2.0), replace=True)
    assert sorted(b.refresh()) == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert versions(b) == versions(a) and b.get("k0").version == 2
    b.put("k6", emoji(), replace=False)  # b appends after a's compaction: the numbering continues
    assert a.refresh() == ["k6"] and versions(a) == versions(b)


def test_a_line_left_unfinished_by_a_killed_writer_does_not_swallow_the_next(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    a.put("one", emoji(), replace=False)
    b.refresh()
    with open(tmp_path / JOURNAL_NAME, "ab") as fh:
        fh.write(b'{"put":{"name":"ghost","vers')  # a writer was SIGKILLed mid-append
    b.put("two", emoji(), replace=False)
    assert a.refresh() == ["two"] and sorted(read_index(tmp_path)) == ["one", "two"]
    assert sorted(r.name for r in replica(tmp_path).list()) == ["one", "two"]


def test_hand_dropped_file_gets_one_version_whoever_scans(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    (tmp_path / "dropped.safetensors").write_bytes(emoji_bytes())
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: r.scan(), (a, b)))
    assert sorted(results) == [[], ["dropped"]] or results == [["dropped"], ["dropped"]]
    assert a.get("dropped") == b.get("dropped") and a.get("dropped").version == 1
    assert len([ln for ln in (tmp_path / JOURNAL_NAME).read_text().splitlines() if "dropped" in ln]) == 1


def test_read_only_replica_serves_follows_and_refuses_writes(tmp_path):
    writer = replica(tmp_path)
    writer.put("w", emoji(), replace=False)
    ro = replica(tmp_path, read_only=True)
    snapshot = sorted(os.listdir(tmp_path))
    assert versions(ro) == versions(writer) and ro.resolve("w").version == 1
    with pytest.raises(ReadOnlyRegistry):
        ro.put("nope", emoji(), replace=False)
    with pytest.raises(ReadOnlyRegistry):
        ro.delete("w")
    writer.put("w", variant(emoji(), 1.0), replace=True)
    (tmp_path / "by-hand.safetensors").write_bytes(emoji_bytes())
    assert sorted(ro.scan()) == ["by-hand", "w"] and ro.get("w").version == 2
    writer.scan()
    assert versions(ro) == versions(writer)
    assert sorted(os.listdir(tmp_path)) == sorted([*snapshot, "by-hand.safetensors"])  # ro wrote nothing
    with pytest.raises(FileNotFoundError):
        replica(tmp_path / "missing", read_only=True)


# ---- three real servers on one directory --------------------------------------------------------


def upload(url: str, name: str, data: bytes, replace: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", params={"replace": "true"} if replace else None,
                      data={"name": name}, files={"file": (f"{name}.safetensors", data)}, timeout=120)


def complete(url: str, name: str, **extra) -> httpx.Response:
    body = {"model": name, "prompt": GENS[0]["prompt_ids"], "max_tokens": len(GENS[0]["completion_ids"]),
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def wait_for(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - start


def describe(url: str, name: str) -> dict | None:
    r = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    return r.json() if r.status_code == 200 else None


SCAN = 1.0


def test_three_servers_share_one_registry(tmp_path, reft_server_factory):
    registry = tmp_path / "adapters"
    env = {"REFT_MAX_RANK": "512", "REFT_MAX_ADAPTER_BYTES": str(64 << 20), "REFT_SCAN_INTERVAL": str(SCAN),
           "REFT_MAX_BATCH_SIZE": "1"}
    servers = [reft_server_factory(registry, tmp_path / f"s{i}.log", env, start=False) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda s: s.start(), servers))
    urls = [s.url for s in servers]

    # concurrent uploads of different adapters through different replicas
    datas = {f"a{i}": adapter_file.to_bytes(variant(emoji(), i / 7)) for i in range(6)}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda kv: upload(urls[int(kv[0][1:]) % 3], *kv), datas.items()))
    assert [r.status_code for r in results] == [201] * 6, [r.text for r in results]
    for url in urls:  # every replica serves every adapter, with the same version and hash
        wait_for(lambda u=url: all(describe(u, n) for n in datas), 2 * SCAN + 5)
        assert {n: (describe(url, n)["version"], describe(url, n)["sha256"]) for n in datas} == {
            n: (1, hashlib.sha256(d).hexdigest()) for n, d in datas.items()}
    assert complete(urls[2], "a0").status_code == 200

    # a replace through one replica while another serves the old version to a pinned request
    assert upload(urls[0], "race", emoji_bytes()).status_code == 201
    v2 = adapter_file.to_bytes(neutralised(emoji()))
    blocker = {"model": "base", "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=urls[1], timeout=120) as own, ThreadPoolExecutor(2) as pool:
        assert complete(urls[1], "race", max_tokens=1).status_code == 200  # replica 1 has parsed v1
        with own.stream("POST", "/v1/completions", json=blocker) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, which cancels it
            next(line for line in lines if line.startswith("data:"))  # the one row is busy
            old = pool.submit(complete, urls[1], "race")  # queued on replica 1 with v1 pinned
            wait_for(lambda: "vllm:num_requests_waiting 1.0" in httpx.get(urls[1] + "/metrics").text, 30)
            r = upload(urls[0], "race", v2, replace=True)
            assert r.status_code == 201 and r.json()["version"] == 2
            wait_for(lambda: (describe(urls[1], "race") or {}).get("version") == 2, 2 * SCAN + 5)
            assert not old.done()
        assert old.result(timeout=120).json()["choices"][0]["text"] == GENS[0]["completion"]
    assert complete(urls[1], "race").json()["choices"][0]["text"] == GENS[0]["base_completion"]
    assert complete(urls[2], "race").json()["choices"][0]["text"] == GENS[0]["base_completion"]

    # a delete through one replica: 404 on the others within the scan interval
    assert httpx.delete(f"{urls[2]}/v1/adapters/a1", timeout=30).status_code == 204
    for url in urls[:2]:  # within one scan interval, give or take the scan's own time on a busy machine
        assert wait_for(lambda u=url: describe(u, "a1") is None, 2 * SCAN + 5) <= SCAN + 2
        error_of(complete(url, "a1", max_tokens=1), 404)

    # SIGKILL of one replica mid-upload: the others and its restart stay consistent
    big = [adapter_file.to_bytes(random_loreft([2, 9], 512, seed)) for seed in (21, 22)]
    assert upload(urls[1], "big", big[0]).status_code == 201
    tmp_seen = threading.Event()
    up = SlowUpload(urls[0], "big", big[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and up.thread.is_alive():
        if any(n.startswith(".tmp-") for n in os.listdir(registry)):
            tmp_seen.set()
            break
    servers[0].proc.send_signal(signal.SIGKILL)
    servers[0].proc.wait(30)
    up.thread.join(60)
    left = [n for n in os.listdir(registry) if n.startswith(".tmp-")]
    servers[0].start()  # its restart removes its own dead temporary file, never another's
    assert not [n for n in os.listdir(registry) if n.startswith(".tmp-")]
    on_disk = hashlib.sha256((registry / "big.safetensors").read_bytes()).hexdigest()
    index = read_index(registry)
    assert index["big"]["sha256"] == on_disk
    for url in urls:
        wait_for(lambda u=url: (describe(u, "big") or {}).get("sha256") == on_disk, 2 * SCAN + 5)
        assert describe(url, "big")["version"] == index["big"]["version"]
        assert complete(url, "big", max_tokens=1).status_code == 200
    stored = [hashlib.sha256(adapter_file.to_bytes(adapter_file.loads(d, SHAPE, 512))).hexdigest() for d in big]
    assert on_disk == stored[index["big"]["version"] - 1], "the file is neither v1 nor v2 (a partial write?)"
    print("sigkill:", "tmp file seen" if tmp_seen.is_set() else "no tmp file seen", "left", left,
          "upload", up.status or up.error, "version", index["big"]["version"])
    assert sorted(read_index(registry)) == sorted([*[n for n in datas if n != "a1"], "race", "big"])
    assert INDEX_NAME in os.listdir(registry)
