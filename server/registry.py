"""The adapter registry: a directory that is the single source of truth, and survives restarts.

Layout of the directory:
    NAME.safetensors     the current version of adapter NAME (native format); a file dropped in
                         by hand or by a deploy tool is picked up by the next scan
    .registry.json       name -> version, sha256, bytes, created, and the file's size/mtime, so a
                         restart neither re-hashes nor re-validates files it already knows
Every write goes to a temporary file that is fsynced, then renamed over its target, then the
directory is fsynced: a crash at any moment leaves the old version or the new one, never a
partial file. Temporary files left behind by a crash are removed at start-up.

Adapters are parsed from disk on first use and kept in a bounded host-memory LRU keyed by
(name, sha256); a request holds the parsed Adapter it resolved, so replacing or deleting an
adapter never disturbs requests already running with it.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import tarfile
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from server import adapter_file
from server.adapter_file import Adapter, AdapterError
from server.engine.adapter_cache import AdapterRef
from server.model import ModelShape

log = logging.getLogger(__name__)

INDEX_NAME = ".registry.json"
TMP_PREFIX = ".tmp-"
SUFFIX = ".safetensors"
MAX_ARCHIVE_MEMBERS = 256
HOST_CACHE_SIZE = 1024


class UnknownAdapter(KeyError):
    """No adapter of that name is registered."""


class AdapterExists(ValueError):
    """The name is taken and replace was not asked for."""


class AdapterTooLarge(ValueError):
    """An upload or archive member over the configured size limit."""


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry knows of an adapter without parsing its tensors."""

    name: str
    version: int
    sha256: str
    bytes: int
    created: float
    types: list[str]
    layers: list[int]
    rank: int
    positions: str
    share_weights: bool
    file_size: int
    file_mtime_ns: int

    def describe(self) -> dict:
        out = asdict(self)
        del out["file_size"], out["file_mtime_ns"]
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> os.stat_result:
    """Write `data` to `path` so that readers (and crashes) see the old bytes or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide adapters from a server running as another user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path.stat()


class Registry:
    def __init__(self, directory: Path, base: ModelShape, *, max_rank: int, max_adapter_bytes: int) -> None:
        self.directory = Path(directory)
        self.base = base
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self._records: dict[str, AdapterRecord] = {}
        self._parsed: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._rejected: dict[str, tuple[int, int]] = {}  # hand-dropped files that failed validation
        self._lock = threading.RLock()
        self.on_removed: list[Callable[[str], None]] = []  # told of every adapter removed or replaced

    # ---- start-up and scanning --------------------------------------------------------------

    def open(self) -> float:
        """Read the index and the directory; returns the seconds it took."""
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)
        try:
            index = json.loads((self.directory / INDEX_NAME).read_text())
        except FileNotFoundError:
            index = {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is unreadable; rebuilding it from the adapter files", INDEX_NAME)
            index = {}
        with self._lock:
            for name, entry in index.items() if isinstance(index, dict) else ():
                try:
                    self._records[name] = AdapterRecord(**entry)
                except TypeError:
                    continue
            self.scan(write_index=False)
            self._write_index()
        return time.perf_counter() - start

    def scan(self, write_index: bool = True) -> list[str]:
        """Bring the records in line with the directory: new, changed and removed files."""
        changed: list[str] = []
        with self._lock:
            present: dict[str, os.stat_result] = {}
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file(
                        follow_symlinks=False
                    ):
                        present[entry.name[: -len(SUFFIX)]] = entry.stat(follow_symlinks=False)
            for name in [n for n in self._records if n not in present]:
                del self._records[name]
                changed.append(name)
            for name, st in present.items():
                record = self._records.get(name)
                if record and (record.file_size, record.file_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    continue
                if self._rejected.get(name) == (st.st_size, st.st_mtime_ns):
                    continue
                try:
                    adapter_file.validate_name(name)
                    data = (self.directory / (name + SUFFIX)).read_bytes()
                    if len(data) > self.max_adapter_bytes:
                        raise AdapterError(f"{len(data)} bytes is over the limit of {self.max_adapter_bytes}")
                    adapter = adapter_file.loads(data, self.base, self.max_rank)
                except (AdapterError, OSError) as exc:
                    log.error("ignoring %s%s in %s: %s", name, SUFFIX, self.directory, exc)
                    self._rejected[name] = (st.st_size, st.st_mtime_ns)
                    self._records.pop(name, None)
                    changed.append(name)
                    continue
                sha = adapter_file.sha256(data)
                if record and record.sha256 == sha:
                    self._records[name] = _with_stat(record, st)
                    continue
                version = record.version + 1 if record else 1
                self._records[name] = _record(name, version, sha, adapter, len(data), st)
                self._remember(name, sha, adapter)
                changed.append(name)
            if changed and write_index:
                self._write_index()
        for name in changed:
            self._notify(name)
        return changed

    # ---- reads ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise UnknownAdapter(name)
        return record

    def list(self, limit: int | None = None, after: str | None = None) -> list[AdapterRecord]:
        """Records sorted by name; `after` and `limit` page through them."""
        names = sorted(self._records)
        if after is not None:
            names = names[bisect.bisect_right(names, after) :]
        if limit is not None:
            names = names[:limit]
        return [self._records[n] for n in names if n in self._records]

    def resolve(self, name: str) -> AdapterRef:
        """Pin the current version of `name`: parse it on first use, then from the host cache."""
        with self._lock:
            record = self.get(name)
            key = (name, record.sha256)
            adapter = self._parsed.get(key)
            if adapter is not None:
                self._parsed.move_to_end(key)
                return AdapterRef(name, record.version, adapter, record.sha256)
        data = (self.directory / (name + SUFFIX)).read_bytes()
        sha = adapter_file.sha256(data)
        if sha != record.sha256:  # changed on disk since the last scan
            self.scan()
            return self.resolve(name)
        adapter = adapter_file.loads(data, self.base, self.max_rank)
        with self._lock:
            self._remember(name, sha, adapter)
        return AdapterRef(name, record.version, adapter, sha)

    # ---- writes -----------------------------------------------------------------------------

    def parse_upload(self, data: bytes, positions: str | None, share_weights: bool) -> Adapter:
        """A validated Adapter from uploaded bytes: native safetensors, or a pyreft .zip/.tar.gz."""
        if len(data) > self.max_adapter_bytes:
            raise AdapterTooLarge(f"upload is {len(data)} bytes; the limit is {self.max_adapter_bytes}")
        if data[:4] == b"PK\x03\x04" or data[:2] == b"\x1f\x8b":
            if not positions:
                raise AdapterError("a pyreft archive needs 'positions' (e.g. f3+l3): pyreft does not record them")
            with tempfile.TemporaryDirectory(prefix="reft-upload-") as tmp:
                root = extract_archive(data, Path(tmp), self.max_adapter_bytes)
                return adapter_file.import_pyreft(root, positions, share_weights, self.base, self.max_rank)
        return adapter_file.loads(data, self.base, self.max_rank)

    def put(self, name: str, adapter: Adapter, replace: bool) -> AdapterRecord:
        """Store `adapter` as the new current version of `name`, atomically."""
        adapter_file.validate_name(name)
        data = adapter_file.to_bytes(adapter)
        sha = adapter_file.sha256(data)
        with self._lock:
            old = self._records.get(name)
            if old is not None and not replace:
                raise AdapterExists(f"adapter {name!r} exists (version {old.version}); pass replace=true to replace it")
            st = atomic_write(self.directory / (name + SUFFIX), data)
            record = _record(name, old.version + 1 if old else 1, sha, adapter, len(data), st)
            self._records[name] = record
            self._rejected.pop(name, None)
            self._remember(name, sha, adapter)
            self._write_index()
        if old is not None:
            self._notify(name)
        return record

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            (self.directory / (name + SUFFIX)).unlink(missing_ok=True)
            _fsync_dir(self.directory)
            del self._records[name]
            self._write_index()
        self._notify(name)

    # ---- internals --------------------------------------------------------------------------

    def _remember(self, name: str, sha: str, adapter: Adapter) -> None:
        self._parsed[(name, sha)] = adapter
        self._parsed.move_to_end((name, sha))
        while len(self._parsed) > HOST_CACHE_SIZE:
            self._parsed.popitem(last=False)

    def _write_index(self) -> None:
        index = {name: asdict(r) for name, r in self._records.items()}
        atomic_write(self.directory / INDEX_NAME, json.dumps(index, separators=(",", ":")).encode())

    def _notify(self, name: str) -> None:
        for callback in self.on_removed:
            callback(name)


def _record(name: str, version: int, sha: str, adapter: Adapter, size: int, st: os.stat_result) -> AdapterRecord:
    return AdapterRecord(
        name=name, version=version, sha256=sha, bytes=size, created=time.time(), types=adapter.types,
        layers=adapter.layers, rank=adapter.max_rank, positions=str(adapter.positions),
        share_weights=adapter.share_weights, file_size=st.st_size, file_mtime_ns=st.st_mtime_ns,
    )


def _with_stat(record: AdapterRecord, st: os.stat_result) -> AdapterRecord:
    return AdapterRecord(**{**asdict(record), "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns})


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in name:
        raise AdapterError(f"archive member {name!r} points outside the archive")
    return path


def extract_archive(data: bytes, dest: Path, max_bytes: int) -> Path:
    """Extract a pyreft save directory from a .zip or .tar.gz, refusing anything hostile.

    Refused: absolute or '..' paths, links and device files, more than MAX_ARCHIVE_MEMBERS
    members, and members or totals over `max_bytes` once uncompressed (zip bombs).
    Returns the directory holding config.json.
    """
    total = 0
    members: list[tuple[PurePosixPath, bytes]] = []
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_ARCHIVE_MEMBERS:
                    raise AdapterError(f"archive has {len(infos)} members; at most {MAX_ARCHIVE_MEMBERS} are allowed")
                for info in infos:
                    path = _safe_member_path(info.filename)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise AdapterError(f"archive member {info.filename!r} is a symbolic link")
                    if info.is_dir():
                        continue
                    total += info.file_size
                    if info.file_size > max_bytes or total > max_bytes:
                        raise AdapterTooLarge(f"archive expands beyond the limit of {max_bytes} bytes")
                    with zf.open(info) as fh:
                        content = fh.read(max_bytes + 1)
                    if len(content) > max_bytes:
                        raise AdapterTooLarge(f"archive member {info.filename!r} expands beyond {max_bytes} bytes")
                    members.append((path, content))
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
                count = 0
                for info in tf:
                    count += 1
                    if count > MAX_ARCHIVE_MEMBERS:
                        raise AdapterError(f"archive has more than {MAX_ARCHIVE_MEMBERS} members")
                    path = _safe_member_path(info.name)
                    if info.issym() or info.islnk():
                        raise AdapterError(f"archive member {info.name!r} is a link")
                    if info.isdir():
                        continue
                    if not info.isfile():
                        raise AdapterError(f"archive member {info.name!r} is not a regular file")
                    total += info.size
                    if info.size > max_bytes or total > max_bytes:
                        raise AdapterTooLarge(f"archive expands beyond the limit of {max_bytes} bytes")
                    fh = tf.extractfile(info)
                    members.append((path, fh.read() if fh else b""))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise AdapterError(f"archive is corrupt: {exc}") from exc
    configs = [p for p, _ in members if p.name == "config.json"]
    if len(configs) != 1:
        raise AdapterError("archive must hold exactly one pyreft config.json")
    root = configs[0].parent
    for path, content in members:
        if path.parent == root and (path.name == "config.json" or path.name.endswith(".bin")):
            (dest / path.name).write_bytes(content)
    return dest
