"""Hostile files in the registry and in uploads (issue 21, points 2 and 4, and point 1's weight range).

A file in the registry directory may be written by any tool; one that cannot be parsed is
rejected alone (logged, counted, listed for the admin) and never stops a scan, a replica's
following of the others, or a start-up. Archives and adapters are bounded before the work.

Unit tests run `Registry` objects on temporary directories; the HTTP tests run two real servers
on one directory (the second one stands for "another replica").
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
import torch

from server import adapter_file
from server.adapter_file import METADATA_KEY, AdapterError
from server.api.app import ROUTERS
from server.api.dependencies import Access, route_access
from server.interventions import Intervention
from server.positions import Positions
from server.registry import INDEX_NAME, JOURNAL_NAME, AdapterTooLarge, Registry, extract_archive, read_index
from tests.conftest import error_of
from tests.test_registry import (
    EMOJI_DIR,
    GENS,
    SHAPE,
    edited,
    emoji,
    emoji_bytes,
    pyreft_members,
    variant,
    zip_of,
)
from tests.test_security import ADMIN, USER, asgi_client, bearer, run

pytestmark = pytest.mark.timeout(300)

MAX_BYTES = 256 * 1024
SPARSE_BYTES = 512 << 20  # an "oversized" file: sparse, so it costs no disk


# ---- hostile native files -------------------------------------------------------------------------


def raw_safetensors(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def huge_int_header() -> bytes:
    return raw_safetensors(b'{"__metadata__": {"x": "y"}, "n": ' + b"9" * 5000 + b"}")


def deep_header() -> bytes:
    return raw_safetensors(b"[" * 50_000 + b"]" * 50_000)


def huge_int_positions() -> bytes:
    return edited(lambda m: m.update(positions="f" + "9" * 5000))


def with_raw_metadata(raw: str) -> bytes:
    """The emoji adapter's bytes with its metadata string replaced by `raw` (no validation)."""
    data = emoji_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"][METADATA_KEY] = raw
    return raw_safetensors(json.dumps(header).encode()) + data[8 + length:]


def deep_metadata() -> bytes:
    return with_raw_metadata('{"format_version": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")


def huge_int_metadata() -> bytes:
    return with_raw_metadata('{"format_version": ' + "9" * 5000 + "}")


PARSER_CASES = {
    "huge int in the header": (huge_int_header, "header"),
    "deep nesting in the header": (deep_header, "header"),
    "huge int in positions": (huge_int_positions, "positions"),
    "deep nesting in the metadata": (deep_metadata, "metadata"),
    "huge int in the metadata": (huge_int_metadata, "metadata"),
}


@pytest.mark.parametrize("case", sorted(PARSER_CASES))
def test_parser_refuses_hostile_json_with_an_adapter_error(case):
    make, match = PARSER_CASES[case]
    with pytest.raises(AdapterError, match=match):
        adapter_file.loads(make(), SHAPE, 64)


def test_positions_refuse_huge_counts_with_the_limit():
    with pytest.raises(ValueError, match="4096"):
        Positions.parse("f" + "9" * 5000)
    with pytest.raises(ValueError, match="4096"):
        Positions.parse("f1+l" + "9" * 5000)


# ---- a live Registry with bad files dropped in ------------------------------------------------------


def bad_files(directory: Path) -> dict[str, int]:
    """Drop one file of each hostile kind into `directory`; returns name -> size on disk."""
    files = {"huge-int": huge_int_header(), "deep": deep_header(), "positions": huge_int_positions(),
             "random": os.urandom(4096)}
    for name, data in files.items():
        (directory / f"{name}.safetensors").write_bytes(data)
    with open(directory / "oversized.safetensors", "wb") as fh:
        fh.truncate(SPARSE_BYTES)
    return {**{n: len(d) for n, d in files.items()}, "oversized": SPARSE_BYTES}


def open_registry(path: Path, **kw) -> Registry:
    reg = Registry(path, SHAPE, max_rank=64, max_adapter_bytes=MAX_BYTES, **kw)
    reg.open()
    return reg


def test_bad_files_in_a_live_registry_are_rejected_alone(tmp_path):
    (tmp_path / "good.safetensors").write_bytes(emoji_bytes())
    (tmp_path / "gone.safetensors").write_bytes(adapter_file.to_bytes(variant(emoji(), 0.5)))
    a, b = open_registry(tmp_path), open_registry(tmp_path)
    sizes = bad_files(tmp_path)
    assert a.scan() == []  # nothing valid changed; no exception either
    rejected = {r.name: r for r in a.rejected()}
    assert set(rejected) == set(sizes)
    for name, size in sizes.items():
        r = rejected[name]
        assert r.file_size == size and r.path == str(tmp_path / f"{name}.safetensors") and r.reason
        assert time.time() - 60 < r.when <= time.time()
    assert str(MAX_BYTES) in rejected["oversized"].reason and str(SPARSE_BYTES) in rejected["oversized"].reason
    assert "4300 digits" in rejected["huge-int"].reason and "recursion" in rejected["deep"].reason
    assert "4096" in rejected["positions"].reason
    assert a.rejections == len(sizes)
    assert a.scan() == [] and a.rejections == len(sizes)  # unchanged files are not re-read
    # another replica deletes and replaces: the first still follows
    b.scan()
    b.delete("gone")
    b.put("good", variant(emoji(), 1.0), replace=True)
    assert sorted(a.scan()) == ["gone", "good"]
    assert "gone" not in a and a.get("good").version == 2 and a.resolve("good").version == 2
    # a restart with the bad files present
    c = open_registry(tmp_path)
    assert sorted(r.name for r in c.list()) == ["good"] and {r.name for r in c.rejected()} == set(sizes)
    # a rejected file that is fixed is accepted at the next scan, and leaves the list
    (tmp_path / "deep.safetensors").write_bytes(emoji_bytes())
    assert a.scan() == ["deep"] and "deep" not in {r.name for r in a.rejected()}


def test_an_oversized_file_is_refused_from_its_size_without_reading_it(tmp_path):
    reg = open_registry(tmp_path)
    with open(tmp_path / "model.safetensors", "wb") as fh:
        fh.truncate(SPARSE_BYTES)
    tracemalloc.start()
    try:
        reg.scan()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.name for r in reg.rejected()] == ["model"]
    assert peak < 8 << 20, f"scanning one oversized file allocated {peak} bytes"


def test_a_file_replaced_by_an_oversized_one_after_the_scan_is_not_read_whole(tmp_path):
    reg = open_registry(tmp_path)
    reg.put("x", emoji(), replace=False)
    reg._parsed.clear()  # as after a restart or an eviction: the next request reads the file
    with open(tmp_path / "x.safetensors", "r+b") as fh:
        fh.truncate(SPARSE_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - unknown or changed, either way not served
            reg.resolve("x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"resolving allocated {peak} bytes"
    assert "x" not in reg and [r.name for r in reg.rejected()] == ["x"]


@pytest.mark.parametrize("line", [b'{"seq": ' + b"9" * 5000 + b"}", b"[" * 200_000 + b"]" * 200_000])
def test_a_hostile_journal_line_neither_stops_following_nor_start_up(tmp_path, line):
    a, b = open_registry(tmp_path), open_registry(tmp_path)
    a.put("x", emoji(), replace=False)
    with open(tmp_path / JOURNAL_NAME, "ab") as fh:
        fh.write(line + b"\n")
    b.refresh()
    a.put("y", emoji(), replace=False)
    assert sorted(b.refresh()) == ["x", "y"] or {"x", "y"} <= {r.name for r in b.list()}
    assert sorted(r.name for r in open_registry(tmp_path).list()) == ["x", "y"]


def mistyped_index(directory: Path) -> bytes:
    """The real index with one record's field of the wrong type (its file's size and time still match)."""
    record = read_index(directory)["x"]
    return json.dumps({"format": 2, "seq": 0, "adapters": {"x": {**record, "layers": "4,10"}}}).encode()


@pytest.mark.parametrize("index", [lambda _: b'{"format": 2, "seq": ' + b"9" * 5000 + b', "adapters": {}}',
                                   lambda _: b"[" * 50_000 + b"]" * 50_000, mistyped_index])
def test_a_hostile_index_is_rebuilt_from_the_files(tmp_path, index):
    open_registry(tmp_path).put("x", emoji(), replace=False)
    (tmp_path / INDEX_NAME).write_bytes(index(tmp_path))
    (tmp_path / JOURNAL_NAME).unlink(missing_ok=True)
    reg = open_registry(tmp_path)
    assert [(r.name, r.layers) for r in reg.list()] == [("x", [4, 10])] and reg.resolve("x").version >= 1


# ---- archives: bounded before the work ------------------------------------------------------------


def gzipped_tar_with_header(kind: bytes, claimed: int) -> bytes:
    """A .tar.gz whose first member is an extension header (GNU long name or PAX) of `claimed` bytes."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, claimed
    out = io.BytesIO()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out.write(comp.compress(info.tobuf(tarfile.GNU_FORMAT)))
    zeros = bytes(1 << 20)
    for _ in range(claimed >> 20):
        out.write(comp.compress(zeros))
    out.write(comp.flush())
    return out.getvalue()


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                                  tarfile.XGLTYPE])
def test_tar_extension_header_bomb_is_refused_before_it_is_read(tmp_path, kind):
    claimed = 256 << 20
    data = gzipped_tar_with_header(kind, claimed)
    assert len(data) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(AdapterTooLarge, match=str(claimed)):
            extract_archive(data, tmp_path, 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"a {claimed}-byte header raised the peak by {peak} bytes"


def test_tar_chain_of_long_names_is_refused(tmp_path):
    block = tarfile.TarInfo("././@LongLink")
    block.type, block.size = tarfile.GNUTYPE_LONGNAME, 512
    one = block.tobuf(tarfile.GNU_FORMAT) + b"a" * 511 + b"\0"
    data = gzip.compress(one * 5000 + bytes(1024))
    with pytest.raises((AdapterError, AdapterTooLarge)):
        extract_archive(data, tmp_path, 64 << 20)


def test_zip_central_directory_is_bounded_before_it_is_parsed(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(40_000):
            zf.writestr(f"f{i}", b"")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(AdapterError, match="central directory"):
            extract_archive(data, tmp_path, 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"refusing a {len(data)}-byte zip allocated {peak} bytes"


def encrypted_zip() -> bytes:
    """A pyreft zip whose members are flagged encrypted (zipfile writes no encryption itself)."""
    data = bytearray(zip_of(pyreft_members()))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos != -1:
            data[pos + flag_at] |= 1
            pos = data.find(sig, pos + 4)
    return bytes(data)


def pyreft_with_scalar_bias() -> bytes:
    name = sorted(p.name for p in EMOJI_DIR.glob("*.bin"))[0]
    state = torch.load(EMOJI_DIR / name, weights_only=True)
    state["bias"] = torch.tensor(1.0)
    buf = io.BytesIO()
    torch.save(state, buf)
    return zip_of(pyreft_members(bins={name: buf.getvalue()}))


def pyreft_with_many_interventions(count: int) -> bytes:
    config = json.loads((EMOJI_DIR / "config.json").read_text())
    for key in ("sorted_keys", "intervention_types", "representations"):
        config[key] = (config[key] * count)[:count]
    return zip_of([("emoji/config.json", json.dumps(config).encode()), *pyreft_members()[1:]])


def test_encrypted_zip_member_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="encrypted"):
        extract_archive(encrypted_zip(), tmp_path, 64 << 20)


def test_scalar_pyreft_bias_is_refused(tmp_path):
    reg = open_registry(tmp_path / "reg")
    with pytest.raises(AdapterError, match="bias"):
        reg.parse_upload(pyreft_with_scalar_bias(), "f2+l2", True)


# ---- interventions per adapter ------------------------------------------------------------------


def many(count: int) -> adapter_file.Adapter:
    iv = emoji().interventions[0]
    ivs = [Intervention(iv.type, iv.layer, iv.rank, {k: v.clone() for k, v in iv.tensors.items()})
           for _ in range(count)]
    return adapter_file.build(ivs, Positions.parse("f1+l1"), True, SHAPE, "float32")


def test_interventions_per_adapter_are_bounded_when_validated(tmp_path):
    data = adapter_file.to_bytes(many(65))
    with pytest.raises(AdapterError, match="65 interventions.*64"):
        adapter_file.loads(data, SHAPE, 64, max_interventions=64)
    assert len(adapter_file.loads(data, SHAPE, 64, max_interventions=65).interventions) == 65
    reg = open_registry(tmp_path, max_interventions=8)
    with pytest.raises(AdapterError, match="9 interventions.*8"):
        reg.parse_upload(adapter_file.to_bytes(many(9)), None, False)
    with pytest.raises(AdapterError, match="9 interventions.*8"):
        reg.parse_upload(pyreft_with_many_interventions(9), "f2+l2", True)
    (tmp_path / "many.safetensors").write_bytes(adapter_file.to_bytes(many(9)))
    reg.scan()
    assert "many" not in reg and "8" in reg.rejected()[0].reason


# ---- weights whose magnitude can overflow the serving dtype ------------------------------------------


def scaled(adapter: adapter_file.Adapter, factor: float) -> adapter_file.Adapter:
    ivs = [Intervention(iv.type, iv.layer, iv.rank, {**iv.tensors, "weight": iv.tensors["weight"] * factor})
           for iv in adapter.interventions]
    return adapter_file.build(ivs, adapter.positions, adapter.share_weights, adapter.base, adapter.dtype)


def test_range_rule_accepts_trained_adapters_and_refuses_overflowing_ones():
    for path in sorted(Path("adapters").glob("*.safetensors")):
        adapter = adapter_file.load(path, SHAPE, 64)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            adapter_file.check_range(adapter, dtype)
    big = scaled(emoji(), 1000.0)
    with pytest.raises(AdapterError, match="float16"):
        adapter_file.check_range(big, torch.float16)
    adapter_file.check_range(big, torch.float32)
    with pytest.raises(AdapterError, match="float32"):
        adapter_file.check_range(scaled(emoji(), 1e30), torch.float32)


def test_the_registry_applies_the_range_rule_of_its_serving_dtype(tmp_path):
    reg = open_registry(tmp_path, serving_dtype=torch.float16)
    big = adapter_file.to_bytes(scaled(emoji(), 1000.0))
    with pytest.raises(AdapterError, match="float16"):
        reg.parse_upload(big, None, False)
    with pytest.raises(AdapterError, match="float16"):
        reg.put("big", scaled(emoji(), 1000.0), replace=False)
    (tmp_path / "big.safetensors").write_bytes(big)
    reg.scan()
    assert "big" not in reg and "float16" in reg.rejected()[0].reason
    ok = open_registry(tmp_path / "fp32")
    assert ok.put("big", scaled(emoji(), 1000.0), replace=False).version == 1


# ---- two real servers on one directory -----------------------------------------------------------


SCAN = 0.3


@pytest.fixture(scope="module")
def pair(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("hostile")
    registry = root / "adapters"
    registry.mkdir()
    (registry / "good.safetensors").write_bytes(emoji_bytes())
    (registry / "gone.safetensors").write_bytes(adapter_file.to_bytes(variant(emoji(), 0.5)))
    lora_root = root / "lora"
    lora_root.mkdir()
    (lora_root / "ok.safetensors").write_bytes(emoji_bytes())
    env = {"REFT_MAX_ADAPTER_BYTES": str(MAX_BYTES), "REFT_SCAN_INTERVAL": str(SCAN), "REFT_MAX_BATCH_SIZE": "2",
           "REFT_ALLOW_RUNTIME_ADAPTER_UPDATES": "1", "REFT_RUNTIME_ADAPTER_ROOT": str(lora_root),
           "REFT_MAX_INTERVENTIONS": "8"}
    a = reft_server_factory(registry, root / "a.log", env)
    b = reft_server_factory(registry, root / "b.log", env)
    yield a, b, registry
    a.stop()
    b.stop()


def describe(url: str, name: str) -> dict | None:
    r = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    return r.json() if r.status_code == 200 else None


def rejected(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/adapters/-/rejected", timeout=30)
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["data"]}


def complete(url: str, name: str) -> httpx.Response:
    body = {"model": name, "prompt": GENS[0]["prompt_ids"], "max_tokens": 2, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def wait(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_bad_files_dropped_into_a_live_registry_stop_no_replica(pair):
    a, b, registry = pair
    sizes = bad_files(registry)
    assert wait(lambda: set(rejected(a.url)) == set(sizes)), rejected(a.url)
    listed = rejected(a.url)
    assert {n: e["size"] for n, e in listed.items()} == sizes
    assert all(e["path"].endswith(f"{n}.safetensors") and e["reason"] and e["when"] > 0 for n, e in listed.items())
    assert metric(a.url, "reft_registry_rejected_files") == len(sizes)
    assert metric(a.url, "reft_registry_rejections_total") >= len(sizes)
    assert "ignoring deep.safetensors" in a.log()
    assert complete(a.url, "good").status_code == 200
    # deletes and replaces made through the other replica are still seen
    assert httpx.delete(f"{b.url}/v1/adapters/gone", timeout=30).status_code == 204
    new = adapter_file.to_bytes(variant(emoji(), 1.0))
    r = httpx.post(f"{b.url}/v1/adapters", params={"replace": "true"}, data={"name": "good"},
                   files={"file": ("good.safetensors", new)}, timeout=60)
    assert r.status_code == 201, r.text
    assert wait(lambda: describe(a.url, "gone") is None and (describe(a.url, "good") or {}).get("version") == 2)
    assert describe(a.url, "good")["sha256"] == hashlib.sha256(new).hexdigest()
    assert complete(a.url, "good").status_code == 200
    # a restart with the bad files present turns healthy
    a.stop()
    a.start(timeout=120)
    assert set(rejected(a.url)) == set(sizes) and complete(a.url, "good").status_code == 200


def test_rejected_files_are_for_the_admin_only(pair):
    a, _, _ = pair
    assert httpx.get(f"{a.url}/v1/adapters/-/rejected", timeout=30).status_code == 200  # loopback, no admin key
    route = next(r for router in ROUTERS for r in router.routes if getattr(r, "path", "") == "/v1/adapters/-/rejected")
    assert route_access(route) is Access.ADMIN

    async def go():
        async with asgi_client(host="0.0.0.0", api_key=USER) as c:
            error_of(await c.get("/v1/adapters/-/rejected", headers=bearer(USER)), 403)
        async with asgi_client(host="0.0.0.0", api_key=USER, admin_key=ADMIN) as c:
            error_of(await c.get("/v1/adapters/-/rejected", headers=bearer(USER)), 401)
            assert (await c.get("/v1/adapters/-/rejected", headers=bearer(ADMIN))).status_code == 503  # past the gate

    run(go())


HTTP_UPLOADS = {
    "huge int in the header": (huge_int_header(), None, 400, "header"),
    "deep nesting in the header": (deep_header(), None, 400, "header"),
    "huge int in positions": (huge_int_positions(), None, 400, "positions"),
    "encrypted zip": (encrypted_zip(), "f2+l2", 400, "encrypted"),
    "scalar pyreft bias": (pyreft_with_scalar_bias(), "f2+l2", 400, "bias"),
    "too many interventions": (adapter_file.to_bytes(many(9)), None, 400, "9 interventions"),
    "weights that overflow float32": (adapter_file.to_bytes(scaled(emoji(), 1e30)), None, 400, "overflow float32"),
}


@pytest.mark.parametrize("case", sorted(HTTP_UPLOADS))
def test_http_uploads_of_hostile_files_get_a_clear_error(pair, case):
    a, _, _ = pair
    data, positions, status, match = HTTP_UPLOADS[case]
    form = {"name": "hostile", **({"positions": positions, "share_weights": "true"} if positions else {})}
    r = httpx.post(f"{a.url}/v1/adapters", data=form, files={"file": ("a.bin", data)}, timeout=60)
    assert match in error_of(r, status)


def test_http_tar_header_bomb_is_413_with_the_numbers(pair):
    a, _, _ = pair
    data = gzipped_tar_with_header(tarfile.GNUTYPE_LONGNAME, 64 << 20)
    assert len(data) < MAX_BYTES
    r = httpx.post(f"{a.url}/v1/adapters", data={"name": "bomb", "positions": "f2+l2"},
                   files={"file": ("a.tar.gz", data)}, timeout=60)
    assert str(64 << 20) in error_of(r, 413)


def test_http_nul_in_lora_path_is_400(pair):
    a, _, _ = pair
    r = httpx.post(f"{a.url}/v1/load_lora_adapter", json={"lora_name": "nul", "lora_path": "ok\0.safetensors"},
                   timeout=30)
    assert "NUL" in error_of(r, 400)
    r = httpx.post(f"{a.url}/v1/load_lora_adapter", json={"lora_name": "ok", "lora_path": "ok.safetensors"},
                   timeout=30)
    assert r.status_code == 200, r.text
