"""The adapter registry: a directory that is the single source of truth, and survives restarts.

Layout of the directory:
    NAME.safetensors     the current version of adapter NAME (native format); a file dropped in
                         by hand or by a deploy tool is picked up by the next scan
    .registry.json       name -> version, sha256, bytes, created, and the file's size/mtime, so a
                         restart neither re-hashes nor re-validates files it already knows
    .registry.journal    one JSON line per change since .registry.json was written, so an upload
                         or delete appends a line instead of rewriting the index of every adapter;
                         folded into .registry.json at start-up and every COMPACT_AFTER lines
Every adapter file goes to a temporary file that is fsynced, then renamed over its target, then
the directory is fsynced: a crash at any moment leaves the old version or the new one, never a
partial file. Temporary files left behind by a crash are removed at start-up. The index is a
cache of the files: a record whose file's size or mtime no longer match is re-read and re-hashed.

Adapters are parsed from disk on first use and kept in a host-memory LRU keyed by (name, sha256),
bounded in bytes (`host_cache_bytes`); a request holds the parsed Adapter it resolved, so replacing or deleting an
adapter never disturbs requests already running with it.

Locking: `_write_lock` serialises changes (put, delete, scan), which do their file work under it;
`_lock` guards the in-memory maps for moments only, so lookups never wait on disk or on a scan.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from server import adapter_file
from server.adapter_file import Adapter, AdapterError
from server.engine.adapter_cache import AdapterRef
from server.model import ModelShape

log = logging.getLogger(__name__)

INDEX_NAME = ".registry.json"
JOURNAL_NAME = ".registry.journal"
COMPACT_AFTER = 1000  # journal lines before the index is rewritten whole
TMP_PREFIX = ".tmp-"
SUFFIX = ".safetensors"
MAX_ARCHIVE_MEMBERS = 256
REJECTED_LIMIT = 4096  # remembered invalid files; one forgotten is only re-validated at the next scan


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


def read_index(directory: Path) -> dict[str, dict]:
    """The records as last written: the index, with the journal's changes replayed over it."""
    try:
        index = json.loads((directory / INDEX_NAME).read_text())
    except FileNotFoundError:
        index = {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; rebuilding it from the adapter files", INDEX_NAME)
        index = {}
    if not isinstance(index, dict):
        index = {}
    try:
        lines = (directory / JOURNAL_NAME).read_bytes().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the last line of a journal cut short by a crash
        if isinstance(entry, dict) and isinstance(entry.get("put"), dict) and "name" in entry["put"]:
            index[entry["put"]["name"]] = entry["put"]
        elif isinstance(entry, dict) and isinstance(entry.get("delete"), str):
            index.pop(entry["delete"], None)
    return index


class Registry:
    def __init__(
        self, directory: Path, base: ModelShape, *, max_rank: int, max_adapter_bytes: int,
        host_cache_bytes: int = 1 << 30,
    ) -> None:
        self.directory = Path(directory)
        self.base = base
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self._records: dict[str, AdapterRecord] = {}
        self._sorted: list[str] | None = None  # names in order, rebuilt after a change for paging
        self.host_cache_bytes = host_cache_bytes
        self._parsed: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._parsed_bytes = 0
        self._rejected: dict[str, tuple[int, int]] = {}  # hand-dropped files that failed validation
        self._journal_lines = 0
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self.on_removed: list[Callable[[str], None]] = []  # told of every adapter removed or replaced

    # ---- start-up and scanning --------------------------------------------------------------

    def open(self) -> float:
        """Read the index and the directory, then fold the journal into the index; returns seconds."""
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)
        with self._write_lock:
            for entry in read_index(self.directory).values():
                try:
                    record = AdapterRecord(**entry)
                except TypeError:
                    continue
                self._records[record.name] = record
            self._sorted = None
            self._scan(journal=False)
            self._compact()
        return time.perf_counter() - start

    def scan(self) -> list[str]:
        """Bring the records in line with the directory: new, changed and removed files."""
        with self._write_lock:
            changed = self._scan(journal=True)
        for name in changed:
            self._notify(name)
        return changed

    def _scan(self, journal: bool) -> list[str]:
        present: dict[str, os.stat_result] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file(
                    follow_symlinks=False
                ):
                    present[entry.name[: -len(SUFFIX)]] = entry.stat(follow_symlinks=False)
        records = self._records  # only this thread changes it while the write lock is held
        for name in [n for n in self._rejected if n not in present]:  # removed since: forget it
            del self._rejected[name]
        updates: dict[str, AdapterRecord | None] = {name: None for name in records if name not in present}
        parsed: list[tuple[str, str, Adapter]] = []
        for name, st in present.items():
            record = records.get(name)
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
                self._reject(name, st)
                if record:
                    updates[name] = None
                continue
            sha = adapter_file.sha256(data)
            if record and record.sha256 == sha:
                updates[name] = _with_stat(record, st)
                continue
            updates[name] = _record(name, record.version + 1 if record else 1, sha, adapter, len(data), st)
            parsed.append((name, sha, adapter))
        if not updates:
            return []
        changed = [n for n, r in updates.items() if r is None or n not in records or r.sha256 != records[n].sha256]
        self._apply(updates, parsed)
        if journal:
            self._journal([{"delete": n} if r is None else {"put": asdict(r)} for n, r in updates.items()])
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
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._records)
            names, records = self._sorted, self._records
            lo = bisect.bisect_right(names, after) if after is not None else 0
            hi = len(names) if limit is None else lo + limit
            return [records[n] for n in names[lo:hi]]

    def cached(self, name: str) -> AdapterRef | None:
        """Pin the current version of `name` if it is parsed already (no disk, no torch); else None."""
        with self._lock:
            record = self.get(name)
            key = (name, record.sha256)
            adapter = self._parsed.get(key)
            if adapter is None:
                return None
            self._parsed.move_to_end(key)
            return AdapterRef(name, record.version, adapter, record.sha256)

    def resolve(self, name: str, _retry: bool = True) -> AdapterRef:
        """Pin the current version of `name`: parse it on first use, then from the host cache."""
        ref = self.cached(name)
        if ref is not None:
            return ref
        record = self.get(name)
        try:
            data = (self.directory / (name + SUFFIX)).read_bytes()
        except FileNotFoundError:
            data = b""
        sha = adapter_file.sha256(data)
        if sha != record.sha256:  # changed or removed on disk since the last scan
            if not _retry:
                raise AdapterError(f"the file of {name!r} is changing on disk; retry shortly")
            self.scan()
            return self.resolve(name, _retry=False)
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
        with self._write_lock:
            old = self._records.get(name)
            if old is not None and not replace:
                raise AdapterExists(f"adapter {name!r} exists (version {old.version}); pass replace=true to replace it")
            st = atomic_write(self.directory / (name + SUFFIX), data)
            record = _record(name, old.version + 1 if old else 1, sha, adapter, len(data), st)
            self._rejected.pop(name, None)
            self._apply({name: record}, [(name, sha, adapter)])
            self._journal([{"put": asdict(record)}])
        if old is not None:
            self._notify(name)
        return record

    def delete(self, name: str) -> None:
        with self._write_lock:
            self.get(name)
            (self.directory / (name + SUFFIX)).unlink(missing_ok=True)
            _fsync_dir(self.directory)
            self._apply({name: None})
            self._journal([{"delete": name}])
        self._notify(name)

    # ---- internals --------------------------------------------------------------------------

    def _apply(
        self, updates: dict[str, AdapterRecord | None], parsed: Sequence[tuple[str, str, Adapter]] = ()
    ) -> None:
        """Set (or, for None, remove) records and keep what was parsed: the one place records change."""
        with self._lock:
            for name, record in updates.items():
                old = self._records.get(name)
                if old is not None and (record is None or record.sha256 != old.sha256):
                    self._forget(name, old.sha256)
                if record is None:
                    self._records.pop(name, None)
                else:
                    self._records[name] = record
            self._sorted = None
            for name, sha, adapter in parsed:
                self._remember(name, sha, adapter)

    def _remember(self, name: str, sha: str, adapter: Adapter) -> None:
        """Keep a parsed adapter, evicting the least recently used while over the byte budget."""
        self._forget(name, sha)
        self._parsed[(name, sha)] = adapter
        self._parsed_bytes += host_nbytes(adapter)
        while self._parsed_bytes > self.host_cache_bytes and self._parsed:
            self._parsed_bytes -= host_nbytes(self._parsed.popitem(last=False)[1])

    def _forget(self, name: str, sha: str) -> None:
        adapter = self._parsed.pop((name, sha), None)
        if adapter is not None:
            self._parsed_bytes -= host_nbytes(adapter)

    def _reject(self, name: str, st: os.stat_result) -> None:
        """Remember an invalid file so scans do not re-read it until it changes; the oldest go past the limit."""
        self._rejected.pop(name, None)
        self._rejected[name] = (st.st_size, st.st_mtime_ns)
        while len(self._rejected) > REJECTED_LIMIT:
            del self._rejected[next(iter(self._rejected))]

    def _journal(self, entries: list[dict]) -> None:
        """Append changes to the journal (fsynced); rewrite the index once the journal is long."""
        path = self.directory / JOURNAL_NAME
        created = not path.exists()
        with open(path, "ab") as fh:
            fh.write(b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries))
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(self.directory)
        self._journal_lines += len(entries)
        if self._journal_lines >= COMPACT_AFTER:
            self._compact()

    def _compact(self) -> None:
        """Write every record to the index, then drop the journal it now contains."""
        with self._lock:
            index = {name: asdict(r) for name, r in self._records.items()}
        atomic_write(self.directory / INDEX_NAME, json.dumps(index, separators=(",", ":")).encode())
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)
        _fsync_dir(self.directory)
        self._journal_lines = 0

    def _notify(self, name: str) -> None:
        for callback in self.on_removed:
            callback(name)


def host_nbytes(adapter: Adapter) -> int:
    """Bytes of an adapter's tensors in host memory."""
    return sum(t.nbytes for iv in adapter.interventions for t in iv.tensors.values())


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
