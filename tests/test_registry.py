"""The adapter registry: unit tests on temporary directories, hostile uploads, hot swap and crash safety.

Unit tests use `server.registry.Registry` with a SmolLM2-shaped `ModelShape` and load no model.
HTTP tests run against one real `reft-serve serve` process (`server`, one running row so queued
requests can be held back); the crash test starts, SIGKILLs and restarts its own process.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import secrets
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server import adapter_file
from server.adapter_file import METADATA_KEY, Adapter, AdapterError
from server.interventions import Intervention
from server.model import ModelShape
from server.positions import Positions
from server.registry import (
    HOST,
    INDEX_NAME,
    JOURNAL_NAME,
    LOCK_NAME,
    MAX_ARCHIVE_MEMBERS,
    STALE_TMP_SECONDS,
    AdapterExists,
    AdapterTooLarge,
    Registry,
    UnknownAdapter,
    extract_archive,
    read_index,
)
from tests.conftest import error_of

EMOJI_DIR = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((EMOJI_DIR / "expected.json").read_text())["emoji"]
GENS = EXPECTED["generations"]
SHAPE = ModelShape("llama", 576, 30)
D = SHAPE.hidden_size
MAX_RANK = 16  # for the unit registries and the HTTP server
MAX_BYTES = 256 * 1024  # REFT_MAX_ADAPTER_BYTES of the HTTP server and the unit registries
BIN_NAMES = sorted(p.name for p in EMOJI_DIR.glob("*.bin"))

pytestmark = pytest.mark.timeout(300)


# ---- adapters -----------------------------------------------------------------------------------


def emoji() -> Adapter:
    return adapter_file.import_pyreft(EMOJI_DIR, "f2+l2", True, SHAPE, 64)


def variant(adapter: Adapter, shift: float) -> Adapter:
    """The same interventions with every bias moved: different weights, different outputs."""
    ivs = [Intervention(iv.type, iv.layer, iv.rank, {**iv.tensors, "bias": iv.tensors["bias"] + shift})
           for iv in adapter.interventions]
    return adapter_file.build(ivs, adapter.positions, adapter.share_weights, adapter.base, adapter.dtype)


def neutralised(adapter: Adapter) -> Adapter:
    """LoReFT with W = Rᵀ's rows and b = 0 edits nothing: h + Rᵀ(Rh + 0 - Rh) = h, so the base model's output."""
    ivs = [Intervention(iv.type, iv.layer, iv.rank, {**iv.tensors, "weight": iv.tensors["rotate_layer"].T.contiguous(),
                                                     "bias": torch.zeros_like(iv.tensors["bias"])})
           for iv in adapter.interventions]
    return adapter_file.build(ivs, adapter.positions, adapter.share_weights, adapter.base, adapter.dtype)


def random_loreft(layers: list[int], rank: int, seed: int, base: ModelShape = SHAPE) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    ivs = []
    for layer in layers:
        q, _ = torch.linalg.qr(torch.randn(base.hidden_size, rank, generator=gen, dtype=torch.float64))
        tensors = {"rotate_layer": q.float().contiguous(),
                   "weight": torch.randn(rank, base.hidden_size, generator=gen) / base.hidden_size ** 0.5,
                   "bias": torch.randn(rank, generator=gen) * 0.1}
        ivs.append(Intervention("loreft", layer, rank, tensors))
    return adapter_file.build(ivs, Positions.parse("f1+l1"), True, base, "float32")


def emoji_bytes() -> bytes:
    return adapter_file.to_bytes(emoji())


def edited(meta_edit=None, tensor_edit=None) -> bytes:
    """The emoji adapter's native bytes with its metadata and/or tensors edited (no validation)."""
    data = emoji_bytes()
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][METADATA_KEY])
    tensors = dict(st_load(data))
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def _set(tensors, key, index, value):
    t = tensors[key].clone()
    t.view(-1)[index] = value
    tensors[key] = t


class Evil:
    """Unpickling this runs code that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Evil(marker))


def evil_torch_file(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": Evil(marker)}, buf)
    return buf.getvalue()


# ---- archives -----------------------------------------------------------------------------------


def zip_of(members: list[tuple[str, bytes]], *, symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, content)
    return buf.getvalue()


def tar_of(members: list[tuple[str, bytes]], *, links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buf.getvalue()


def pyreft_members(prefix: str = "emoji/", bins: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    members = [(prefix + "config.json", (EMOJI_DIR / "config.json").read_bytes())]
    for name in BIN_NAMES:
        members.append((prefix + name, (bins or {}).get(name, (EMOJI_DIR / name).read_bytes())))
    return members


def zip_lying_about_size(real: bytes, claimed: int) -> bytes:
    """A zip whose headers claim `claimed` bytes for a member that inflates to len(real)."""
    data = bytearray(zip_of([*pyreft_members(), ("emoji/pad.bin", real)]))
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.find(sig)
        while pos != -1:
            name_len = int.from_bytes(data[pos + (26 if sig == b"PK\x03\x04" else 28):][:2], "little")
            name_at = pos + (30 if sig == b"PK\x03\x04" else 46)
            if bytes(data[name_at:name_at + name_len]) == b"emoji/pad.bin":
                data[pos + offset:pos + offset + 4] = claimed.to_bytes(4, "little")
            pos = data.find(sig, pos + 4)
    return bytes(data)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def index_of(directory: Path) -> dict:
    """The records on disk, as a restarted server would read them."""
    return read_index(directory)


# ---- Registry: unit tests -----------------------------------------------------------------------


def open_registry(path: Path, max_rank: int = MAX_RANK, max_bytes: int = MAX_BYTES) -> Registry:
    reg = Registry(path, SHAPE, max_rank=max_rank, max_adapter_bytes=max_bytes)
    reg.open()
    return reg


def test_put_get_list_delete_replace(tmp_path):
    reg = open_registry(tmp_path)
    assert len(reg) == 0 and reg.list() == []
    base = emoji()
    for name in ("c", "a", "b", "d"):
        record = reg.put(name, base, replace=False)
        assert record.version == 1 and record.name == name
    assert [r.name for r in reg.list()] == ["a", "b", "c", "d"]
    assert [r.name for r in reg.list(limit=2)] == ["a", "b"]
    assert [r.name for r in reg.list(after="b")] == ["c", "d"]
    assert [r.name for r in reg.list(after="a", limit=2)] == ["b", "c"]
    assert [r.name for r in reg.list(after="bb", limit=5)] == ["c", "d"]
    assert reg.list(after="d") == []
    assert len(reg) == 4 and "a" in reg and "zz" not in reg

    a = reg.get("a")
    file_bytes = (tmp_path / "a.safetensors").read_bytes()
    assert a.sha256 == hashlib.sha256(file_bytes).hexdigest() and a.bytes == len(file_bytes)
    desc = a.describe()
    assert desc["types"] == ["loreft"] and desc["layers"] == [4, 10] and desc["rank"] == 4
    assert desc["positions"] == "f2+l2" and desc["share_weights"] is True
    assert "file_size" not in desc and "file_mtime_ns" not in desc

    with pytest.raises(AdapterExists):
        reg.put("a", variant(base, 1.0), replace=False)
    assert reg.get("a").sha256 == a.sha256 and (tmp_path / "a.safetensors").read_bytes() == file_bytes

    new = reg.put("a", variant(base, 1.0), replace=True)
    assert new.version == 2 and new.sha256 != a.sha256
    assert new.sha256 == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    assert reg.put("a", base, replace=True).version == 3
    assert index_of(tmp_path)["a"]["version"] == 3

    reg.delete("b")
    assert "b" not in reg and not (tmp_path / "b.safetensors").exists() and "b" not in index_of(tmp_path)
    with pytest.raises(UnknownAdapter):
        reg.get("b")
    with pytest.raises(UnknownAdapter):
        reg.delete("b")
    with pytest.raises(UnknownAdapter):
        reg.resolve("b")
    for bad in ("a/b", "..", ".", "a b", "x" * 65, ""):
        with pytest.raises(AdapterError):
            reg.put(bad, base, replace=False)
    assert reg.put("x" * 64, base, replace=False).version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        INDEX_NAME, JOURNAL_NAME, LOCK_NAME, "a.safetensors", "c.safetensors", "d.safetensors",
        "x" * 64 + ".safetensors",
    ])


def test_index_survives_reopen(tmp_path):
    reg = open_registry(tmp_path)
    reg.put("one", emoji(), replace=False)
    reg.put("two", emoji(), replace=False)
    reg.put("two", variant(emoji(), 0.5), replace=True)
    before = {r.name: r for r in reg.list()}
    again = open_registry(tmp_path)
    after = {r.name: r for r in again.list()}
    assert after == before  # same versions, hashes and creation times: nothing re-registered
    assert again.get("two").version == 2
    assert again.put("two", emoji(), replace=True).version == 3
    ref = again.resolve("one")
    assert ref.version == 1 and ref.sha256 == before["one"].sha256


def test_unreadable_index_is_rebuilt_from_files(tmp_path):
    reg = open_registry(tmp_path)
    reg.put("one", emoji(), replace=False)
    (tmp_path / INDEX_NAME).write_text("{not json")
    again = open_registry(tmp_path)
    assert [r.name for r in again.list()] == ["one"]
    assert again.get("one").sha256 == reg.get("one").sha256
    assert set(index_of(tmp_path)) == {"one"}


def drop(directory: Path, name: str, data: bytes) -> None:
    """Place a file as a deploy tool would: written aside, then renamed into place."""
    tmp = directory / f"incoming-{secrets.token_hex(4)}"
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)


def test_writes_append_to_the_journal_and_reopen_folds_it_in(tmp_path):
    reg = open_registry(tmp_path)
    assert not (tmp_path / JOURNAL_NAME).exists()
    index_before = (tmp_path / INDEX_NAME).read_bytes()
    reg.put("one", emoji(), replace=False)
    reg.put("two", emoji(), replace=False)
    reg.put("one", variant(emoji(), 0.5), replace=True)
    reg.delete("two")
    assert (tmp_path / INDEX_NAME).read_bytes() == index_before  # no write rewrote the whole index
    lines = [json.loads(line) for line in (tmp_path / JOURNAL_NAME).read_text().splitlines()]
    assert [next(iter(e)) for e in lines] == ["put", "put", "put", "delete"]
    assert set(index_of(tmp_path)) == {"one"} and index_of(tmp_path)["one"]["version"] == 2

    again = open_registry(tmp_path)
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert set(json.loads((tmp_path / INDEX_NAME).read_text())["adapters"]) == {"one"}
    assert again.get("one") == reg.get("one") and "two" not in again


def test_a_journal_line_cut_short_by_a_crash_is_ignored(tmp_path):
    reg = open_registry(tmp_path)
    reg.put("one", emoji(), replace=False)
    reg.put("one", variant(emoji(), 0.5), replace=True)
    with open(tmp_path / JOURNAL_NAME, "ab") as fh:
        fh.write(b'{"put":{"name":"ghost","vers')  # the process died mid-append
    again = open_registry(tmp_path)
    assert [r.name for r in again.list()] == ["one"] and again.get("one").version == 2


def test_replaying_a_journal_already_in_the_index_changes_nothing(tmp_path):
    """A crash between writing the folded index and removing the journal replays it twice."""
    reg = open_registry(tmp_path)
    reg.put("one", emoji(), replace=False)
    reg.put("one", variant(emoji(), 0.5), replace=True)
    reg.put("two", emoji(), replace=False)
    reg.delete("two")
    journal = (tmp_path / JOURNAL_NAME).read_bytes()
    open_registry(tmp_path)
    (tmp_path / JOURNAL_NAME).write_bytes(journal)
    again = open_registry(tmp_path)
    assert [r.name for r in again.list()] == ["one"] and again.get("one") == reg.get("one")


def test_journal_is_folded_into_the_index_when_long(tmp_path, monkeypatch):
    monkeypatch.setattr("server.registry.shared_index.COMPACT_AFTER", 3)
    reg = open_registry(tmp_path)
    for i in range(3):
        reg.put(f"a{i}", emoji(), replace=False)
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert set(json.loads((tmp_path / INDEX_NAME).read_text())["adapters"]) == {"a0", "a1", "a2"}
    reg.put("a3", emoji(), replace=False)
    assert len((tmp_path / JOURNAL_NAME).read_text().splitlines()) == 1
    assert set(index_of(tmp_path)) == {"a0", "a1", "a2", "a3"}


def test_listing_follows_changes(tmp_path):
    reg = open_registry(tmp_path)
    for name in ("b", "a"):
        reg.put(name, emoji(), replace=False)
    assert [r.name for r in reg.list()] == ["a", "b"]
    reg.put("c", emoji(), replace=False)
    reg.delete("a")
    drop(tmp_path, "aa.safetensors", emoji_bytes())
    reg.scan()
    assert [r.name for r in reg.list()] == ["aa", "b", "c"]
    assert [r.name for r in reg.list(after="aa", limit=1)] == ["b"]


def test_resolve_notices_a_file_removed_by_hand(tmp_path):
    reg = open_registry(tmp_path)
    reg.put("gone", emoji(), replace=False)
    reg._parsed.clear()  # as after a restart: the next resolve reads the file
    (tmp_path / "gone.safetensors").unlink()
    with pytest.raises(UnknownAdapter):
        reg.resolve("gone")
    assert "gone" not in reg


def test_scan_picks_up_dropped_files_with_validation(tmp_path):
    reg = open_registry(tmp_path)
    assert reg.scan() == []
    drop(tmp_path, "dropped.safetensors", emoji_bytes())
    drop(tmp_path, "garbage.safetensors", b"this is not an adapter" * 10)
    drop(tmp_path, "wide.safetensors", edited(lambda m: m["base"].update(hidden_size=768)))
    drop(tmp_path, "deep.safetensors", edited(lambda m: m["interventions"][0].update(layer=30)))
    drop(tmp_path, "bad name.safetensors", emoji_bytes())
    drop(tmp_path, "notes.txt", b"ignored")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.safetensors").write_bytes(emoji_bytes())
    (tmp_path / "linked.safetensors").symlink_to(tmp_path / "elsewhere" / "real.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / ".hidden.safetensors").write_bytes(emoji_bytes())
    drop(tmp_path, "huge.safetensors", adapter_file.to_bytes(random_loreft([1, 2, 3, 4, 5], 16, 1)))
    changed = reg.scan()
    assert "dropped" in changed
    assert [r.name for r in reg.list()] == ["dropped"]
    for bad in ("garbage", "wide", "deep", "bad name", "huge", "linked", "folder", ".hidden"):
        assert bad not in reg
        with pytest.raises(UnknownAdapter):
            reg.resolve(bad)
    assert set(index_of(tmp_path)) == {"dropped"}
    record = reg.get("dropped")
    assert record.version == 1
    assert record.sha256 == hashlib.sha256((tmp_path / "dropped.safetensors").read_bytes()).hexdigest()
    assert reg.scan() == []  # nothing new: the rejected files are not re-reported

    # a new version dropped over it, a fixed file dropped over a rejected one, a removal
    drop(tmp_path, "dropped.safetensors", adapter_file.to_bytes(variant(emoji(), 1.0)))
    drop(tmp_path, "garbage.safetensors", emoji_bytes())
    assert sorted(reg.scan()) == ["dropped", "garbage"]
    assert reg.get("dropped").version == 2 and reg.get("garbage").version == 1
    (tmp_path / "garbage.safetensors").unlink()
    assert reg.scan() == ["garbage"] and "garbage" not in reg and set(index_of(tmp_path)) == {"dropped"}
    # a file edited in place (not renamed) is a new version at the next scan
    (tmp_path / "dropped.safetensors").write_bytes(emoji_bytes())
    assert reg.scan() == ["dropped"]
    ref = reg.resolve("dropped")
    assert ref.version == 3 and ref.sha256 == hashlib.sha256(emoji_bytes()).hexdigest()


def test_stale_tmp_files_removed_on_open(tmp_path):
    """Only crash leftovers go: a dead process's file on this host, or any file older than the limit."""
    reg = open_registry(tmp_path)
    reg.put("keep", emoji(), replace=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - STALE_TMP_SECONDS - 60
    (tmp_path / f".tmp-{HOST}-{dead.pid}-abc123").write_bytes(b"half a file")  # its writer died
    for name in (".tmp-abc123", ".tmp-zz.safetensors", ".tmp-otherhost-1-x1y2"):
        (tmp_path / name).write_bytes(emoji_bytes()[:100])
        os.utime(tmp_path / name, (old, old))  # old enough, whoever wrote it
    live = [f".tmp-{HOST}-{os.getppid()}-inflight", ".tmp-otherhost-1-inflight"]  # uploads in flight
    for name in live:
        (tmp_path / name).write_bytes(b"being written")
    (tmp_path / "unrelated.bin").write_bytes(b"x")
    again = open_registry(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([INDEX_NAME, LOCK_NAME, "keep.safetensors", "unrelated.bin", *live])
    assert [r.name for r in again.list()] == ["keep"]


def test_resolve_pins_the_version(tmp_path):
    reg = open_registry(tmp_path)
    original = emoji()
    reg.put("pin", original, replace=False)
    old = reg.resolve("pin")
    assert old.version == 1 and old.name == "pin"
    reg.put("pin", variant(original, 2.0), replace=True)
    new = reg.resolve("pin")
    assert new.version == 2 and new.sha256 != old.sha256 and new.key != old.key
    for a, b in zip(old.adapter.interventions, original.interventions, strict=True):
        assert torch.equal(a.tensors["bias"], b.tensors["bias"])
    for a, b in zip(new.adapter.interventions, original.interventions, strict=True):
        assert torch.allclose(a.tensors["bias"], b.tensors["bias"] + 2.0)
    reg.delete("pin")
    assert torch.equal(old.adapter.interventions[0].tensors["bias"], original.interventions[0].tensors["bias"])
    assert new.adapter.interventions[0].tensors["weight"].shape == (4, D)
    with pytest.raises(UnknownAdapter):
        reg.resolve("pin")


def test_removed_callbacks_fire_on_replace_and_delete(tmp_path):
    reg = open_registry(tmp_path)
    seen: list[str] = []
    reg.on_removed.append(seen.append)
    reg.put("cb", emoji(), replace=False)
    assert seen == []
    reg.put("cb", variant(emoji(), 1.0), replace=True)
    reg.delete("cb")
    assert seen == ["cb", "cb"]


# ---- hostile uploads: unit ----------------------------------------------------------------------


def test_evil_pickle_is_live(tmp_path):
    """The payload below really runs code when unpickled, so the refusals that follow mean something."""
    marker = tmp_path / "marker"
    pickle.loads(evil_pickle(marker))
    assert marker.read_text() == "pwned"


HOSTILE_NATIVE = {
    "not safetensors": (b"\x00\x01 hello, not an adapter" * 8, "not a safetensors file"),
    "empty": (b"", "not a safetensors file"),
    "wrong shape": (edited(tensor_edit=lambda t: t.update({"interventions.0.weight": torch.zeros(4, D - 1)})),
                    "shape"),
    "wrong hidden size": (edited(lambda m: m["base"].update(hidden_size=768)), "hidden size"),
    "wrong layer count": (edited(lambda m: m["base"].update(num_layers=24)), "layer"),
    "layer out of range": (edited(lambda m: m["interventions"][1].update(layer=30)), "layer 30"),
    "negative layer": (edited(lambda m: m["interventions"][0].update(layer=-1)), "layer -1"),
    "nan": (edited(tensor_edit=lambda t: _set(t, "interventions.0.bias", 1, math.nan)), "NaN"),
    "inf": (edited(tensor_edit=lambda t: _set(t, "interventions.1.weight", 7, math.inf)), "NaN or Inf"),
    "rank above max": (adapter_file.to_bytes(random_loreft([3], MAX_RANK * 2, 2)), f"rank {MAX_RANK * 2}"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NATIVE))
def test_parse_upload_refuses_bad_native_files(tmp_path, case):
    data, match = HOSTILE_NATIVE[case]
    reg = open_registry(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(AdapterError, match=match):
        reg.parse_upload(data, None, False)
    assert snapshot(tmp_path) == before


def test_parse_upload_refuses_pickles_without_running_them(tmp_path):
    reg = open_registry(tmp_path / "reg")
    marker = tmp_path / "marker"
    before = snapshot(tmp_path / "reg")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        reg.parse_upload(evil_pickle(marker), None, False)
    for evil in (evil_pickle(marker), evil_torch_file(marker)):
        bins = {BIN_NAMES[0]: evil}
        for archive in (zip_of(pyreft_members(bins=bins)), tar_of(pyreft_members(bins=bins))):
            with pytest.raises(AdapterError, match="tensors-only|not a"):
                reg.parse_upload(archive, "f2+l2", True)
    assert not marker.exists(), "unpickling ran the payload"
    assert snapshot(tmp_path / "reg") == before


def test_parse_upload_accepts_real_archives_and_needs_positions(tmp_path):
    reg = open_registry(tmp_path)
    for archive in (zip_of(pyreft_members()), tar_of(pyreft_members()), zip_of(pyreft_members(prefix=""))):
        adapter = reg.parse_upload(archive, "f2+l2", True)
        assert adapter_file.to_bytes(adapter) == emoji_bytes()
        with pytest.raises(AdapterError, match="positions"):
            reg.parse_upload(archive, None, False)
    with pytest.raises(AdapterError, match="config.json"):
        reg.parse_upload(zip_of([("a/config.json", b"{}"), ("b/config.json", b"{}")]), "f1", False)
    with pytest.raises(AdapterError, match="corrupt"):
        reg.parse_upload(zip_of(pyreft_members())[:-40], "f2+l2", True)
    with pytest.raises(AdapterError, match="corrupt"):
        reg.parse_upload(tar_of(pyreft_members())[:200], "f2+l2", True)
    with pytest.raises(AdapterTooLarge):
        reg.parse_upload(b"\x00" * (MAX_BYTES + 1), None, False)


BOMB = b"\x00" * (MAX_BYTES * 4)
HOSTILE_ARCHIVES = {
    "zip traversal": (zip_of([*pyreft_members(), ("../x", b"escaped")]), AdapterError, "outside"),
    "zip deep traversal": (zip_of([("emoji/../../x/config.json", b"{}")]), AdapterError, "outside"),
    "zip absolute": (zip_of([("/tmp/abs/config.json", b"{}"), *pyreft_members()]), AdapterError, "outside"),
    "zip drive letter": (zip_of([("C:\\x\\config.json", b"{}")]), AdapterError, "outside"),
    "zip symlink": (zip_of([*pyreft_members(), ("emoji/link.bin", b"/etc/passwd")], symlinks=("emoji/link.bin",)),
                    AdapterError, "symbolic link"),
    "zip too many members": (zip_of([*pyreft_members(), *((f"emoji/f{i}", b"") for i in range(MAX_ARCHIVE_MEMBERS))]),
                             AdapterError, "members"),
    "zip bomb": (zip_of([*pyreft_members(), ("emoji/bomb.bin", BOMB)]), AdapterTooLarge, "beyond"),
    "zip bomb lying about its size": (zip_lying_about_size(BOMB, 10), (AdapterError, AdapterTooLarge), None),
    "tar traversal": (tar_of([*pyreft_members(), ("../x", b"escaped")]), AdapterError, "outside"),
    "tar absolute": (tar_of([("/tmp/abs/config.json", b"{}")]), AdapterError, "outside"),
    "tar symlink": (tar_of(pyreft_members(), links={"emoji/l.bin": (tarfile.SYMTYPE, "/etc/passwd")}),
                    AdapterError, "link"),
    "tar hardlink": (tar_of(pyreft_members(), links={"emoji/h.bin": (tarfile.LNKTYPE, "emoji/config.json")}),
                     AdapterError, "link"),
    "tar device": (tar_of(pyreft_members(), links={"emoji/dev.bin": (tarfile.CHRTYPE, "")}),
                   AdapterError, "not a regular file"),
    "tar fifo": (tar_of(pyreft_members(), links={"emoji/fifo.bin": (tarfile.FIFOTYPE, "")}),
                 AdapterError, "not a regular file"),
    "tar too many members": (tar_of([*pyreft_members(), *((f"emoji/f{i}", b"") for i in range(MAX_ARCHIVE_MEMBERS))]),
                             AdapterError, "members"),
    "tar bomb": (tar_of([*pyreft_members(), ("emoji/bomb.bin", BOMB)]), AdapterTooLarge, "beyond"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_extract_archive_refuses_hostile_archives(tmp_path, case):
    data, exc, match = HOSTILE_ARCHIVES[case]
    assert len(data) < MAX_BYTES  # the archive itself is small; only its contents are hostile
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(exc, match=match):
        extract_archive(data, dest, MAX_BYTES)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"], "something was written outside dest"
    reg = open_registry(tmp_path / "reg")
    before = snapshot(tmp_path / "reg")
    with pytest.raises(exc, match=match):
        reg.parse_upload(data, "f2+l2", True)
    assert snapshot(tmp_path / "reg") == before and "x" not in os.listdir(tmp_path)


# ---- the HTTP server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("registry-http")
    registry = root / "adapters"
    registry.mkdir()
    (registry / "emoji.safetensors").write_bytes(emoji_bytes())
    env = {"REFT_MAX_ADAPTER_BYTES": str(MAX_BYTES), "REFT_MAX_RANK": str(MAX_RANK), "REFT_SCAN_INTERVAL": "0.2",
           "REFT_MAX_BATCH_SIZE": "1", "REFT_MAX_QUEUE": "8"}
    srv = reft_server_factory(registry, root / "server.log", env)
    srv.marker = root / "marker"
    yield srv
    srv.stop()


def upload(client: httpx.Client, name: str, data: bytes, filename: str = "a.safetensors", params=None, **form):
    fields = {"name": name, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}}
    return client.post("/v1/adapters", data=fields, params=params,
                       files={"file": (filename, data, "application/octet-stream")})


def complete(client: httpx.Client, model: str, g: dict = GENS[0], max_tokens: int = 32) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": g["prompt_ids"], "temperature": 0,
                                             "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def listed(client: httpx.Client) -> set[str]:
    return {m["id"] for m in client.get("/v1/models").json()["data"]}


def running_and_waiting(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text

    def value(name):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} missing")

    return value("vllm:num_requests_running"), value("vllm:num_requests_waiting")


HTTP_HOSTILE = {
    "not safetensors": (lambda m: b"GIF89a not an adapter at all", "a.safetensors", {}, 400, "safetensors"),
    "bare pickle": (lambda m: evil_pickle(m), "a.bin", {}, 400, "safetensors"),
    "pickle in pyreft zip": (lambda m: zip_of(pyreft_members(bins={BIN_NAMES[0]: evil_torch_file(m)})), "a.zip",
                             {"positions": "f2+l2", "share_weights": True}, 400, "tensors-only"),
    "raw pickle in pyreft tar": (lambda m: tar_of(pyreft_members(bins={BIN_NAMES[1]: evil_pickle(m)})), "a.tar.gz",
                                 {"positions": "f2+l2"}, 400, "tensors-only"),
    "wrong shape": (lambda m: HOSTILE_NATIVE["wrong shape"][0], "a.safetensors", {}, 400, "shape"),
    "wrong hidden size": (lambda m: HOSTILE_NATIVE["wrong hidden size"][0], "a.safetensors", {}, 400, "hidden size"),
    "layer out of range": (lambda m: HOSTILE_NATIVE["layer out of range"][0], "a.safetensors", {}, 400, "layer 30"),
    "nan": (lambda m: HOSTILE_NATIVE["nan"][0], "a.safetensors", {}, 400, "NaN"),
    "inf": (lambda m: HOSTILE_NATIVE["inf"][0], "a.safetensors", {}, 400, "Inf"),
    "rank above REFT_MAX_RANK": (lambda m: HOSTILE_NATIVE["rank above max"][0], "a.safetensors", {}, 400,
                                 f"rank {MAX_RANK * 2}"),
    "over REFT_MAX_ADAPTER_BYTES (parsed)": (lambda m: b"\x00" * (MAX_BYTES + 1000), "a.safetensors", {}, 413, "limit"),
    "over REFT_MAX_ADAPTER_BYTES (body)": (lambda m: b"\x00" * (MAX_BYTES * 3), "a.safetensors", {}, 413, "limit"),
    "archive without positions": (lambda m: zip_of(pyreft_members()), "a.zip", {}, 400, "positions"),
    "bad positions": (lambda m: zip_of(pyreft_members()), "a.zip", {"positions": "middle"}, 400,
                      "positions must look like"),
    "zip traversal": (lambda m: HOSTILE_ARCHIVES["zip traversal"][0], "a.zip", {"positions": "f2+l2"}, 400, "outside"),
    "zip absolute": (lambda m: HOSTILE_ARCHIVES["zip absolute"][0], "a.zip", {"positions": "f2+l2"}, 400, "outside"),
    "zip symlink": (lambda m: HOSTILE_ARCHIVES["zip symlink"][0], "a.zip", {"positions": "f2+l2"}, 400, "link"),
    "tar symlink": (lambda m: HOSTILE_ARCHIVES["tar symlink"][0], "a.tgz", {"positions": "f2+l2"}, 400, "link"),
    "tar traversal": (lambda m: HOSTILE_ARCHIVES["tar traversal"][0], "a.tgz", {"positions": "f2+l2"}, 400,
                      "outside"),
    "too many members": (lambda m: HOSTILE_ARCHIVES["zip too many members"][0], "a.zip", {"positions": "f2+l2"}, 400,
                         "members"),
    "zip bomb": (lambda m: HOSTILE_ARCHIVES["zip bomb"][0], "a.zip", {"positions": "f2+l2"}, 413, "beyond"),
    "tar bomb": (lambda m: HOSTILE_ARCHIVES["tar bomb"][0], "a.tgz", {"positions": "f2+l2"}, 413, "beyond"),
}


@pytest.mark.parametrize("case", sorted(HTTP_HOSTILE))
def test_http_upload_refuses_hostile_files(server, client, case):
    make, filename, form, status, match = HTTP_HOSTILE[case]
    registry = server.registry
    before = snapshot(registry)
    r = upload(client, "hostile", make(server.marker), filename, **form)
    assert match.lower() in error_of(r, status).lower()
    assert not server.marker.exists(), "the server unpickled the payload"
    time.sleep(0.05)
    assert snapshot(registry) == before, "a refused upload changed the registry directory"
    error_of(client.get("/v1/adapters/hostile"), 404)
    assert "hostile" not in listed(client)


@pytest.mark.parametrize("name,statuses", [
    ("a/b", (400,)), ("..", (400,)), (".", (400,)), ("../etc", (400,)), ("has space", (400,)),
    ("x" * 65, (400,)), ("", (400, 422)), ("tab\tname", (400,)), ("ünïcode", (400,)), (".hidden", (400,)),
    ("-flag", (400,)), ("_under", (400,)), ("..a", (400,)), ("trailing\n", (400,)),
])
def test_http_upload_refuses_bad_names(server, client, name, statuses):
    before = snapshot(server.registry)
    error_of(upload(client, name, emoji_bytes()), *statuses)
    assert snapshot(server.registry) == before


def test_http_upload_form_errors(server, client):
    before = snapshot(server.registry)
    error_of(client.post("/v1/adapters", data={"name": "nofile"}), 400, 422)
    error_of(client.post("/v1/adapters", files={"file": ("a.safetensors", emoji_bytes())}), 400, 422)
    error_of(client.post("/v1/adapters", json={"name": "x", "file": "abc"}), 400, 415, 422)
    assert snapshot(server.registry) == before


def test_http_chunked_upload_over_limit_is_413(server, client):
    body, ctype = multipart({"name": "chunky"}, "a.safetensors", b"\x00" * (MAX_BYTES * 2))

    def pieces():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    before = snapshot(server.registry)
    r = client.post("/v1/adapters", content=pieces(), headers={"content-type": ctype})
    assert "content-length" not in r.request.headers
    assert snapshot(server.registry) == before
    error_of(r, 413)


def test_http_names_conflicts_replace_and_delete(server, client):
    r = upload(client, "x" * 64, emoji_bytes())
    assert r.status_code == 201, r.text
    assert client.delete("/v1/adapters/" + "x" * 64).status_code == 204

    r = upload(client, "dup.v-1_a", emoji_bytes())
    assert r.status_code == 201 and r.json()["version"] == 1
    first = r.json()
    on_disk = (server.registry / "dup.v-1_a.safetensors").read_bytes()
    assert first["sha256"] == hashlib.sha256(on_disk).hexdigest() and first["bytes"] == len(on_disk)
    for extra in ({}, {"params": {"replace": "false"}}, {"replace": False}):
        before = snapshot(server.registry)
        assert "replace" in error_of(upload(client, "dup.v-1_a", emoji_bytes(), **extra), 409)
        assert snapshot(server.registry) == before
    r = upload(client, "dup.v-1_a", adapter_file.to_bytes(variant(emoji(), 1.0)), params={"replace": "true"})
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["sha256"] != first["sha256"]
    r = upload(client, "dup.v-1_a", emoji_bytes(), replace=True)
    assert r.status_code == 201 and r.json()["version"] == 3 and r.json()["sha256"] == first["sha256"]
    assert client.get("/v1/adapters/dup.v-1_a").json()["version"] == 3

    page = client.get("/v1/adapters", params={"limit": 1}).json()
    assert len(page["data"]) == 1 and page["has_more"] is True and page["next_after"] == page["data"][0]["name"]
    rest = client.get("/v1/adapters", params={"after": page["next_after"], "limit": 1000}).json()
    names = [a["name"] for a in page["data"] + rest["data"]]
    assert names == sorted(names) and {"dup.v-1_a", "emoji"} <= set(names) and rest["has_more"] is False
    error_of(client.get("/v1/adapters", params={"limit": 0}), 400, 422)

    assert client.delete("/v1/adapters/dup.v-1_a").status_code == 204
    assert not (server.registry / "dup.v-1_a.safetensors").exists()
    error_of(client.delete("/v1/adapters/dup.v-1_a"), 404)
    error_of(client.delete("/v1/adapters/never-existed"), 404)
    error_of(client.post("/v1/completions", json={"model": "dup.v-1_a", "prompt": "Hi", "max_tokens": 1}), 404)


def test_http_concurrent_uploads_of_one_name(server, client):
    def put(i, replace):
        return upload(client, "contended", adapter_file.to_bytes(variant(emoji(), 0.1 * i)), replace=replace)

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda i: put(i, False), range(4)))
    assert sorted(r.status_code for r in first) == [201, 409, 409, 409], [r.text for r in first]
    with ThreadPoolExecutor(4) as pool:
        replaced = list(pool.map(lambda i: put(i + 4, True), range(4)))
    assert all(r.status_code == 201 for r in replaced), [r.text for r in replaced]
    assert sorted(r.json()["version"] for r in replaced) == [2, 3, 4, 5]
    desc = client.get("/v1/adapters/contended").json()
    last = max(replaced, key=lambda r: r.json()["version"]).json()
    assert desc["version"] == 5 and desc["sha256"] == last["sha256"]
    on_disk = (server.registry / "contended.safetensors").read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == desc["sha256"] == index_of(server.registry)["contended"]["sha256"]
    assert client.delete("/v1/adapters/contended").status_code == 204


def test_http_hot_swap(server, client):
    v2 = adapter_file.to_bytes(neutralised(emoji()))
    assert upload(client, "swap", emoji_bytes()).status_code == 201
    assert complete(client, "swap") == GENS[0]["completion"]
    v2_text = GENS[0]["base_completion"]
    r = upload(client, "swap", v2, replace=True)
    assert r.status_code == 201 and r.json()["version"] == 2
    assert complete(client, "swap") == v2_text
    r = upload(client, "swap", emoji_bytes(), params={"replace": "true"})
    assert r.status_code == 201 and r.json()["version"] == 3
    assert complete(client, "swap") == GENS[0]["completion"]


def test_hand_copied_files_are_served_without_restart(server, client):
    registry = server.registry
    drop(registry, "by-hand.safetensors", emoji_bytes())
    drop(registry, "by-hand-broken.safetensors", b"\x00" * 4096)
    drop(registry, "by-hand-wide.safetensors", HOSTILE_NATIVE["wrong hidden size"][0])
    drop(registry, "by-hand-rank.safetensors", HOSTILE_NATIVE["rank above max"][0])
    deadline = time.monotonic() + 15
    while "by-hand" not in listed(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "by-hand" in listed(client), "a file copied into the registry was not picked up"
    time.sleep(0.6)  # a few more scans
    assert complete(client, "by-hand", GENS[4]) == GENS[4]["completion"]
    desc = client.get("/v1/adapters/by-hand").json()
    assert desc["version"] == 1 and desc["sha256"] == hashlib.sha256(emoji_bytes()).hexdigest()
    for bad in ("by-hand-broken", "by-hand-wide", "by-hand-rank"):
        assert bad not in listed(client)
        error_of(client.post("/v1/completions", json={"model": bad, "prompt": "Hi", "max_tokens": 1}), 404)
        error_of(client.get(f"/v1/adapters/{bad}"), 404)
    assert {"by-hand-broken", "by-hand-wide", "by-hand-rank"}.isdisjoint(index_of(registry))
    assert "error" not in client.get("/health").json()

    # a fixed file over a rejected one, a new version over a good one, then removal by hand
    drop(registry, "by-hand-broken.safetensors", emoji_bytes())
    drop(registry, "by-hand.safetensors", adapter_file.to_bytes(neutralised(emoji())))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        "by-hand-broken" not in listed(client) or client.get("/v1/adapters/by-hand").json()["version"] != 2
    ):
        time.sleep(0.1)
    assert "by-hand-broken" in listed(client)
    assert client.get("/v1/adapters/by-hand").json()["version"] == 2
    assert complete(client, "by-hand") == GENS[0]["base_completion"]
    (registry / "by-hand.safetensors").unlink()
    deadline = time.monotonic() + 15
    while "by-hand" in listed(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "by-hand" not in listed(client)
    error_of(client.post("/v1/completions", json={"model": "by-hand", "prompt": "Hi", "max_tokens": 1}), 404)


def test_replace_while_requests_are_in_flight(server, client):
    """A request accepted before a replace finishes with the version it pinned; later ones get the new one."""
    assert upload(client, "race", emoji_bytes()).status_code == 201
    v2 = adapter_file.to_bytes(neutralised(emoji()))
    v2_text = GENS[0]["base_completion"]

    blocker_body = {"model": "base", "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as own, ThreadPoolExecutor(2) as pool:
        with own.stream("POST", "/v1/completions", json=blocker_body) as blocker:
            assert blocker.status_code == 200
            lines = blocker.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # the one running row is now busy
            old = pool.submit(complete, client, "race")
            deadline = time.monotonic() + 10
            while running_and_waiting(client) != (1, 1) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert running_and_waiting(client) == (1, 1), "the race request was not queued behind the blocker"
            r = upload(client, "race", v2, replace=True)
            assert r.status_code == 201 and r.json()["version"] == 2
            new = pool.submit(complete, client, "race")
            deadline = time.monotonic() + 10
            while running_and_waiting(client) != (1, 2) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not old.done() and not new.done()
            r = client.delete("/v1/adapters/race")  # even a delete must not disturb the pinned requests
            assert r.status_code == 204
        # closing the blocker frees the row; the queued requests run in order
        assert old.result(timeout=120) == GENS[0]["completion"]
        assert new.result(timeout=120) == v2_text


# ---- crash safety -------------------------------------------------------------------------------


def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "reft-" + secrets.token_hex(12)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def check_registry_dir(directory: Path, known: dict[str, int], allow_tmp: bool, name: str = "big") -> str:
    """The adapter file is one whole known version and the index parses; returns the file's sha256."""
    if not allow_tmp:
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")], "stale .tmp- files"
    index = index_of(directory)
    assert isinstance(index, dict) and name in index
    data = (directory / f"{name}.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert sha in known, f"{name}.safetensors is neither the old nor the new version (partial write?)"
    adapter = adapter_file.loads(data, SHAPE, 512)
    assert adapter_file.to_bytes(adapter) == data
    return sha


class SlowUpload:
    """POST a multipart upload in 256 KiB pieces from a thread; can stall mid-body and time the body's end."""

    CHUNK = 256 * 1024

    def __init__(self, url: str, name: str, data: bytes, stall_at: float | None = None) -> None:
        self.body, self.ctype = multipart({"name": name, "replace": "true"}, f"{name}.safetensors", data)
        self.url, self.stall_at = url, stall_at
        self.stalled, self.body_done = threading.Event(), threading.Event()
        self.body_done_at = 0.0
        self.status: int | None = None
        self.error: str | None = None
        self.finished_at = 0.0
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _chunks(self):
        for i in range(0, len(self.body), self.CHUNK):
            yield self.body[i:i + self.CHUNK]
            if self.stall_at is not None and i + self.CHUNK >= len(self.body) * self.stall_at:
                self.stalled.set()
                time.sleep(2)  # the server dies here, mid-body
            time.sleep(0.005)
        self.body_done_at = time.monotonic()
        self.body_done.set()

    def _send(self) -> None:
        try:
            with httpx.Client(timeout=120) as c:
                r = c.post(self.url + "/v1/adapters", content=self._chunks(),
                           headers={"content-type": self.ctype, "content-length": str(len(self.body))})
            self.status = r.status_code
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        self.finished_at = time.monotonic()
        self.stalled.set()
        self.body_done.set()


def wait_until(predicate, up: SlowUpload, timeout: float = 60.0) -> bool:
    """Busy-poll (no sleep: the window is milliseconds wide) until `predicate()` or the upload ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not up.thread.is_alive():
            return predicate()
    return False


def test_sigkill_mid_upload_leaves_old_or_new_never_partial(tmp_path, reft_server_factory):
    registry = tmp_path / "adapters"
    big_file = registry / "big.safetensors"
    versions = [random_loreft([2, 9], 512, seed) for seed in (11, 12)]
    datas = [adapter_file.to_bytes(v) for v in versions]
    assert all(len(d) > 4_000_000 for d in datas)
    # what the server will store for each: its own serialisation of the parsed upload
    stored = [adapter_file.to_bytes(adapter_file.loads(d, SHAPE, 512)) for d in datas]
    known = {hashlib.sha256(s).hexdigest(): i for i, s in enumerate(stored)}
    assert len(known) == 2
    reg = Registry(registry, SHAPE, max_rank=512, max_adapter_bytes=64 << 20)
    reg.open()
    reg.put("big", versions[0], replace=False)
    reg.put("mid", versions[0], replace=False)

    def tmp_file_present() -> bool:
        return any(n.startswith(".tmp-") for n in os.listdir(registry))

    def restarted_state(name: str, old: int, old_version: int) -> tuple[int, int]:
        """After a restart: the file is whole, the index and the API agree with it; (version index, version)."""
        sha = check_registry_dir(registry, known, allow_tmp=False, name=name)
        desc = httpx.get(f"{srv.url}/v1/adapters/{name}", timeout=30).json()
        assert desc["sha256"] == sha and index_of(registry)[name]["sha256"] == sha
        landed = known[sha] != old
        assert desc["version"] == old_version + landed
        return known[sha], old_version + landed

    env = {"REFT_MAX_RANK": "512", "REFT_MAX_ADAPTER_BYTES": str(64 << 20), "REFT_SCAN_INTERVAL": "0"}
    srv = reft_server_factory(registry, tmp_path / "server.log", env, start=False)
    outcomes = []
    try:
        srv.start()
        up = SlowUpload(srv.url, "big", datas[1])  # a whole upload works
        up.thread.join(120)
        assert up.status == 201, up.error
        assert known[check_registry_dir(registry, known, allow_tmp=False)] == 1

        # crash 1: "mid" is half-way through its body while "big" (body complete) is being written
        mid = SlowUpload(srv.url, "mid", datas[1], stall_at=0.5)
        assert mid.stalled.wait(120) and mid.status is None
        up = SlowUpload(srv.url, "big", datas[0])
        hit = wait_until(tmp_file_present, up)
        srv.kill()
        up.thread.join(60)
        mid.thread.join(60)
        left_tmp = tmp_file_present()
        # straight after the crash, before any clean-up: each adapter file is whole, old or new
        assert mid.status is None and known[check_registry_dir(registry, known, True, "mid")] == 0, \
            "a half-received upload replaced the adapter"
        sha = check_registry_dir(registry, known, allow_tmp=True)
        if up.status == 201:
            assert known[sha] == 0, "the client was told 201 but the new version is not on disk"
        srv.start()  # restart on the same directory: temporary files go, the index agrees with the files
        assert restarted_state("mid", 0, 1) == (0, 1)
        current, version = restarted_state("big", 1, 2)
        outcomes.append(("temporary file written", "hit" if hit else "missed", up.status or "killed",
                         "tmp left" if left_tmp else "no tmp", f"v{version}"))

        # crash 2: right after the new file was renamed over the old one (before or while the index is written)
        target = 1 - current
        inode = big_file.stat().st_ino
        up = SlowUpload(srv.url, "big", datas[target])
        hit = wait_until(lambda: big_file.stat().st_ino != inode, up)
        srv.kill()
        up.thread.join(60)
        sha = check_registry_dir(registry, known, allow_tmp=True)
        assert known[sha] == target or not hit
        srv.start()
        now, new_version = restarted_state("big", current, version)
        assert now == target or not hit
        outcomes.append(("file renamed into place", "hit" if hit else "missed", up.status or "killed",
                         f"v{new_version}"))
        r = httpx.post(srv.url + "/v1/completions", json={"model": "big", "prompt": [1, 2, 3, 4], "max_tokens": 2},
                       timeout=120)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
    print("crash outcomes:", outcomes)
