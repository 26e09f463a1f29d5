"""The adapter registry: a directory that is the single source of truth, and survives restarts.

Layout of the directory:
    NAME.safetensors     the current version of adapter NAME (native format); a file dropped in
                         by hand or by a deploy tool is picked up by the next scan
    .registry.json       {"format": 2, "seq": S, "adapters": name -> version, sha256, bytes,
                         created, and the file's size/mtime}, so a restart neither re-hashes nor
                         re-validates files it already knows
    .registry.journal    one JSON line per change since .registry.json was written, numbered by
                         "seq", so an upload or delete appends a line instead of rewriting the
                         index of every adapter; folded into .registry.json at start-up and every
                         COMPACT_AFTER lines
    .registry.lock       the lock file that makes the directory safe for many server processes
Every adapter file goes to a temporary file that is fsynced, then renamed over its target, then
the directory is fsynced: a crash at any moment leaves the old version or the new one, never a
partial file. The index is a cache of the files: a record whose file's size or mtime no longer
match is re-read and re-hashed.

Many processes, on one host or on many (a ReadWriteMany volume), may serve one directory. Every
change (upload, replace, delete, a scan that records a hand-dropped file, compaction) happens
under an exclusive `flock` of .registry.lock, after bringing this process's records up to the
shared index and journal, so versions are assigned from the true current state and never twice.
Readers take the lock shared, and only when the index or journal changed on disk (two stats
otherwise). Journal lines carry consecutive sequence numbers, so a reader tailing the journal
notices a compaction or a gap and re-reads the index. A temporary file is named after the host
and process that writes it; start-up removes only those of dead processes on this host, and any
older than STALE_TMP_SECONDS (another host's process cannot be asked). A read-only replica
(`read_only=True`) takes no exclusive lock and writes nothing: it follows the others and the files.

A file in the directory may have been written by any tool, so each is judged alone: its size
from `stat` before a byte is read, then any failure to parse or validate it (whatever the
exception) rejects that file only. A rejected file is logged, counted, listed by `rejected()`
(for the admin's `GET /v1/adapters/-/rejected`) and not read again until it changes; scans, the
following of other replicas and start-up go on without it. The shared index and journal are
read the same way: a line or record that cannot be read is skipped, never fatal.

Adapters are parsed from disk on first use and kept in a host-memory LRU keyed by (name, sha256),
bounded in bytes (`host_cache_bytes`); a request holds the parsed Adapter it resolved, so replacing or deleting an
adapter never disturbs requests already running with it.

Locking: `_write_lock` serialises, within this process, everything that reads or changes the
shared files (put, delete, scan, sync); `_lock` guards the in-memory maps for moments only, so
lookups never wait on disk, on a scan or on another process.
"""

from __future__ import annotations

import bisect
import fcntl
import gzip
import io
import json
import logging
import lzma
import os
import socket
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Literal

import torch

from server import adapter_file
from server.adapter_file import Adapter, AdapterError
from server.engine.adapter_cache import AdapterRef
from server.model import ModelShape

log = logging.getLogger(__name__)

INDEX_NAME = ".registry.json"
JOURNAL_NAME = ".registry.journal"
LOCK_NAME = ".registry.lock"
INDEX_FORMAT = 2
COMPACT_AFTER = 1000  # journal lines before the index is rewritten whole
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 15 * 60  # a temporary file this old is a crash's leftover, whoever wrote it
HOST = socket.gethostname().replace("/", "_") or "localhost"
SUFFIX = ".safetensors"
MAX_ARCHIVE_MEMBERS = 256
MAX_ZIP_DIRECTORY_BYTES = MAX_ARCHIVE_MEMBERS * 1024  # a pyreft save's entries take about 100 bytes each
MAX_TAR_HEADER_BYTES = 1 << 20  # all a tar may take outside member data: headers, long names, PAX records
ARCHIVE_CHUNK = 1 << 16
REJECTED_LIMIT = 4096  # remembered invalid files; one forgotten is only re-validated at the next scan


class UnknownAdapter(KeyError):
    """No adapter of that name is registered."""


class AdapterExists(ValueError):
    """The name is taken and replace was not asked for."""


class AdapterChanged(ValueError):
    """The name no longer holds the version the caller saw (another upload or a delete came first)."""

    def __init__(self, name: str, current: AdapterRecord | None) -> None:
        super().__init__(f"adapter {name!r} changed since it was read")
        self.current = current


class AdapterTooLarge(ValueError):
    """An upload or archive member over the configured size limit."""


class ReadOnlyRegistry(PermissionError):
    """This server was started with a read-only registry: it serves and scans, never writes."""


@dataclass(frozen=True)
class RejectedFile:
    """A file in the directory that is not served, and why (for the log, the metrics and the admin)."""

    name: str
    path: str
    reason: str
    size: int
    mtime_ns: int
    when: float

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "reason": self.reason, "size": self.size, "when": self.when}


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
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{HOST}-{os.getpid()}-", dir=path.parent)
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


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another without reading it: inode, size, mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_index(directory: Path) -> tuple[dict[str, dict], int, tuple[int, int, int] | None]:
    """The index's records, the last journal sequence number folded into it, and its file's identity."""
    try:
        with open(directory / INDEX_NAME, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
    except FileNotFoundError:
        return {}, 0, None
    identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or integers of 4,301+ digits, or deep nesting
        log.warning("%s is unreadable; rebuilding it from the adapter files", INDEX_NAME)
        return {}, 0, identity
    if isinstance(index, dict) and index.get("format") == INDEX_FORMAT:
        adapters, seq = index.get("adapters"), index.get("seq")
    else:  # format 1: the records alone, no sequence number
        adapters, seq = index, 0
    if not isinstance(adapters, dict) or not isinstance(seq, int):
        return {}, 0, identity
    return adapters, seq, identity


def _journal_lines(data: bytes) -> Iterator[tuple[int, dict | None]]:
    """(offset just past the line, its entry or None if unreadable) for each complete line."""
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        try:
            entry = json.loads(data[start:end])
        except (ValueError, RecursionError):
            entry = None  # a line cut short by a crash, ended by the next writer, or written by another tool
        yield end + 1, entry if _readable_entry(entry) else None
        start = end + 1


def _readable_entry(entry: object) -> bool:
    """A journal entry this module wrote: a numbered put of a named record, or a delete of a name."""
    if not isinstance(entry, dict):
        return False
    seq = entry.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        return False
    put, delete = entry.get("put"), entry.get("delete")
    return (isinstance(put, dict) and isinstance(put.get("name"), str)) or isinstance(delete, str)


def _replay(index: dict[str, dict], entry: dict) -> None:
    if isinstance(entry.get("put"), dict) and "name" in entry["put"]:
        index[entry["put"]["name"]] = entry["put"]
    elif isinstance(entry.get("delete"), str):
        index.pop(entry["delete"], None)


def _read_journal(directory: Path) -> tuple[int | None, bytes]:
    try:
        with open(directory / JOURNAL_NAME, "rb") as fh:
            return os.fstat(fh.fileno()).st_ino, fh.read()
    except FileNotFoundError:
        return None, b""


def read_index(directory: Path) -> dict[str, dict]:
    """The records as last written: the index, with the journal's later changes replayed over it."""
    index, seq, _ = _load_index(directory)
    for _, entry in _journal_lines(_read_journal(directory)[1]):
        if entry is not None and entry.get("seq", seq + 1) > seq:
            _replay(index, entry)
    return index


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # one Registry per directory per process: its own files from a past life are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    def __init__(
        self, directory: Path, base: ModelShape, *, max_rank: int, max_adapter_bytes: int, read_only: bool = False,
        host_cache_bytes: int = 1 << 30, max_interventions: int = adapter_file.MAX_INTERVENTIONS,
        serving_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.directory = Path(directory)
        self.base = base
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.max_interventions = max_interventions
        self.serving_dtype = serving_dtype  # adapters that can overflow it are refused (adapter_file.check_range)
        self.read_only = read_only
        self._records: dict[str, AdapterRecord] = {}
        self._sorted: list[str] | None = None  # names in order, rebuilt after a change for paging
        self.host_cache_bytes = host_cache_bytes
        self._parsed: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._parsed_bytes = 0
        self._rejected: dict[str, RejectedFile] = {}  # files that failed validation, until they change
        self.rejections = 0  # files rejected since start-up (a file is counted again only once it changed)
        # how far this process has followed the shared files
        self._index_id: tuple[int, int, int] | None = None
        self._index_seq = 0
        self._journal_ino: int | None = None
        self._journal_offset = 0
        self._seq = 0
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self.on_removed: list[Callable[[str], None]] = []  # told of every adapter removed or replaced

    # ---- start-up and scanning --------------------------------------------------------------

    def open(self) -> float:
        """Read the index and the directory, then (unless read-only) fold the journal into the index."""
        start = time.perf_counter()
        if self.read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"the read-only registry {self.directory} does not exist")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
        with self._write_lock:
            with self._flock(exclusive=not self.read_only):
                self._reload()
                if not self.read_only:
                    self._scan(journal=False)
                    self._compact()
            if self.read_only:
                self._scan(journal=False)
        return time.perf_counter() - start

    def scan(self) -> list[str]:
        """Follow the other processes' changes, then bring the records in line with the directory."""
        with self._write_lock:
            changed = self._follow()
            if self._files_differ():
                if self.read_only:
                    changed += self._scan(journal=False)
                else:
                    with self._flock(exclusive=True):
                        changed += self._sync()
                        changed += self._scan(journal=True)
        changed = list(dict.fromkeys(changed))
        for name in changed:
            self._notify(name)
        return changed

    def refresh(self) -> list[str]:
        """Follow the other processes' changes to the index and journal; two stats when there are none."""
        with self._write_lock:
            changed = self._follow()
        for name in changed:
            self._notify(name)
        return changed

    def _remove_stale_tmp(self) -> None:
        """Remove temporary files of crashed writers: dead processes of this host, or any old enough."""
        now = time.time()
        for path in self.directory.glob(TMP_PREFIX + "*"):
            host, _, pid = path.name[len(TMP_PREFIX):].rpartition("-")[0].rpartition("-")  # HOST-PID-random
            dead = host == HOST and pid.isdigit() and not _pid_alive(int(pid))
            try:
                old = now - path.stat().st_mtime > STALE_TMP_SECONDS
            except FileNotFoundError:
                continue
            if dead or old:
                path.unlink(missing_ok=True)

    @contextmanager
    def _flock(self, exclusive: bool) -> Iterator[None]:
        """Hold .registry.lock against the other processes (shared for reading, exclusive for changes)."""
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY if self.read_only else os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            fd = None  # a read-only replica of a directory no writer has opened yet
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _shared_changed(self) -> bool:
        if _file_id(self.directory / INDEX_NAME) != self._index_id:
            return True
        journal = _file_id(self.directory / JOURNAL_NAME)
        if journal is None:
            return self._journal_offset != 0
        return journal[0] != self._journal_ino or journal[1] != self._journal_offset

    def _follow(self) -> list[str]:
        if not self._shared_changed():
            return []
        with self._flock(exclusive=False):
            return self._sync()

    def _sync(self) -> list[str]:
        """Apply what others appended to the journal since we last read it (a lock is held)."""
        if not self._shared_changed():
            return []
        if _file_id(self.directory / INDEX_NAME) != self._index_id:
            return self._reload()  # compacted (or first read)
        try:
            with open(self.directory / JOURNAL_NAME, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._journal_ino and self._journal_offset:
                    return self._reload()
                if st.st_size < self._journal_offset:
                    return self._reload()
                fh.seek(self._journal_offset)
                data = fh.read()
        except FileNotFoundError:
            return self._reload()
        changes: dict[str, dict | None] = {}
        seq, consumed = self._seq, 0
        for end, entry in _journal_lines(data):
            consumed = end
            if entry is None:
                continue
            number = entry.get("seq")
            if isinstance(number, int) and number > seq + 1:
                return self._reload()  # a gap: the journal we followed was replaced
            if number is None or number == seq + 1:
                if isinstance(entry.get("put"), dict) and "name" in entry["put"]:
                    changes[entry["put"]["name"]] = entry["put"]
                elif isinstance(entry.get("delete"), str):
                    changes[entry["delete"]] = None
                seq = number or seq
        self._journal_ino, self._journal_offset, self._seq = st.st_ino, self._journal_offset + consumed, seq
        return self._adopt(changes, whole=False)

    def _reload(self) -> list[str]:
        """Read the shared index and the whole journal afresh (a lock is held)."""
        index, index_seq, index_id = _load_index(self.directory)
        ino, data = _read_journal(self.directory)
        seq, consumed = index_seq, 0
        for end, entry in _journal_lines(data):
            consumed = end
            if entry is not None and entry.get("seq", seq + 1) > seq:
                _replay(index, entry)
                seq = entry.get("seq", seq)
        self._index_id, self._index_seq = index_id, index_seq
        self._journal_ino, self._journal_offset, self._seq = ino, consumed, seq
        return self._adopt(index, whole=True)

    def _adopt(self, entries: dict[str, dict | None], whole: bool) -> list[str]:
        """Make the shared records ours (`whole`: all of them; else changes, None = deleted).

        Returns the names added, replaced or removed."""
        updates: dict[str, AdapterRecord | None] = (
            {name: None for name in self._records if name not in entries} if whole else {}
        )
        for name, entry in entries.items():
            if entry is None:
                if name in self._records:
                    updates[name] = None
                continue
            record = _record_of(entry)
            if record is None or record.name != name:
                continue  # unreadable: the file, if there is one, is judged by the next scan
            if self._records.get(name) != record:
                updates[name] = record
        changed = [n for n, r in updates.items()
                   if r is None or n not in self._records or r.sha256 != self._records[n].sha256]
        if updates:
            self._apply(updates)
        return changed

    def _files_differ(self) -> bool:
        """Whether the directory holds anything the records (and the rejected files) do not say: a look
        that reads no file."""
        seen = rejected = 0
        with os.scandir(self.directory) as it:
            for entry in it:
                if not entry.name.endswith(SUFFIX) or entry.name.startswith(".") or not entry.is_file(
                    follow_symlinks=False
                ):
                    continue
                name = entry.name[: -len(SUFFIX)]
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    return True  # removed meanwhile
                record = self._records.get(name)
                rejected_file = self._rejected.get(name)
                if record is not None:
                    seen += 1
                    if (record.file_size, record.file_mtime_ns) != (st.st_size, st.st_mtime_ns):
                        return True
                elif rejected_file is None or (rejected_file.size, rejected_file.mtime_ns) != (
                    st.st_size, st.st_mtime_ns
                ):
                    return True
                else:
                    rejected += 1
        return seen != len(self._records) or rejected != len(self._rejected)

    def _scan(self, journal: bool) -> list[str]:
        present: dict[str, os.stat_result] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file(
                    follow_symlinks=False
                ):
                    try:
                        present[entry.name[: -len(SUFFIX)]] = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile: as if never seen
        records = self._records  # only this thread changes it while the write lock is held
        with self._lock:
            for name in [n for n in self._rejected if n not in present]:  # removed since: forget it
                del self._rejected[name]
        updates: dict[str, AdapterRecord | None] = {name: None for name in records if name not in present}
        parsed: list[tuple[str, str, Adapter]] = []
        for name, st in present.items():
            record = records.get(name)
            if record and (record.file_size, record.file_mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
            rejected_file = self._rejected.get(name)
            if rejected_file is not None and (rejected_file.size, rejected_file.mtime_ns) == (
                st.st_size, st.st_mtime_ns
            ):
                continue
            try:
                adapter_file.validate_name(name)
                data = self._read(self.directory / (name + SUFFIX), st.st_size)
                adapter = self._parse(data)
            except Exception as exc:  # noqa: BLE001 - whatever one file does, it is rejected alone
                self._reject(name, st, exc)
                if record:
                    updates[name] = None
                continue
            if rejected_file is not None:
                with self._lock:
                    self._rejected.pop(name, None)
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
            record = self._records.get(name)
            if record is None:
                return None
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
        if name not in self._records:
            self.refresh()  # uploaded through another replica a moment ago?
        record = self.get(name)
        try:
            data = self._read(self.directory / (name + SUFFIX), record.file_size)
        except (OSError, AdapterTooLarge):  # gone, replaced by something else, or grown past the limit
            data = b""
        sha = adapter_file.sha256(data)
        if sha != record.sha256:  # changed or removed on disk since the last scan
            if not _retry:
                raise AdapterError(f"the file of {name!r} is changing on disk; retry shortly")
            self.scan()
            return self.resolve(name, _retry=False)
        adapter = self._parse(data)
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
                return adapter_file.import_pyreft(root, positions, share_weights, self.base, self.max_rank,
                                                  self.max_interventions)
        return self._parse(data)

    def parse_path(self, path: Path, positions: str | None, share_weights: bool) -> Adapter:
        """A validated Adapter from a native file or a pyreft save directory the server can read."""
        if path.is_dir():
            if not positions:
                raise AdapterError("a pyreft directory needs 'positions' (e.g. f3+l3): pyreft does not record them")
            total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            if total > self.max_adapter_bytes:
                raise AdapterTooLarge(f"{path} holds {total} bytes; the limit is {self.max_adapter_bytes}")
            return adapter_file.import_pyreft(path, positions, share_weights, self.base, self.max_rank,
                                              self.max_interventions)
        return self._parse(self._read(path, path.stat().st_size))

    def _read(self, path: Path, size: int) -> bytes:
        """A file's bytes, refused from its `stat` size before any read, and by the read if it grew since."""
        if size > self.max_adapter_bytes:
            raise AdapterTooLarge(
                f"{path} is {size} bytes; the limit is {self.max_adapter_bytes} (REFT_MAX_ADAPTER_BYTES)"
            )
        with open(path, "rb") as fh:
            data = fh.read(self.max_adapter_bytes + 1)
        if len(data) > self.max_adapter_bytes:
            raise AdapterTooLarge(f"{path} grew past the limit of {self.max_adapter_bytes} bytes while it was read")
        return data

    def _parse(self, data: bytes) -> Adapter:
        """A validated Adapter from native bytes, within this server's bounds and serving dtype."""
        adapter = adapter_file.loads(data, self.base, self.max_rank, self.max_interventions)
        adapter_file.check_range(adapter, self.serving_dtype)
        return adapter

    def put(
        self, name: str, adapter: Adapter, replace: bool, expected: AdapterRecord | None | Literal["any"] = "any"
    ) -> AdapterRecord:
        """Store `adapter` as the new current version of `name`, atomically.

        `expected`, when given, is the record the caller read earlier (None: the name was free); if
        any replica has uploaded or deleted the name since, AdapterChanged is raised and nothing written.
        """
        self._check_writable()
        adapter_file.validate_name(name)
        adapter_file.check_count(len(adapter.interventions), self.max_interventions)
        adapter_file.check_range(adapter, self.serving_dtype)
        data = adapter_file.to_bytes(adapter)
        sha = adapter_file.sha256(data)
        with self._write_lock, self._flock(exclusive=True):
            changed = self._sync()
            old = self._records.get(name)
            if expected != "any" and _identity(old) != _identity(expected):
                raise AdapterChanged(name, old)
            if old is not None and not replace:
                raise AdapterExists(f"adapter {name!r} exists (version {old.version}); pass replace=true to replace it")
            st = atomic_write(self.directory / (name + SUFFIX), data)
            record = _record(name, old.version + 1 if old else 1, sha, adapter, len(data), st)
            with self._lock:
                self._rejected.pop(name, None)
            self._apply({name: record}, [(name, sha, adapter)])
            self._journal([{"put": asdict(record)}])
        for changed_name in dict.fromkeys([*changed, *([name] if old is not None else [])]):
            self._notify(changed_name)
        return record

    def delete(self, name: str) -> None:
        self._check_writable()
        with self._write_lock, self._flock(exclusive=True):
            changed = self._sync()
            self.get(name)
            (self.directory / (name + SUFFIX)).unlink(missing_ok=True)
            _fsync_dir(self.directory)
            self._apply({name: None})
            self._journal([{"delete": name}])
        for changed_name in dict.fromkeys([*changed, name]):
            self._notify(changed_name)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyRegistry(
                "this server's adapter registry is read-only (--read-only-registry); "
                "upload, replace or delete adapters through a replica that can write to it"
            )

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

    def rejected(self) -> list[RejectedFile]:
        """The files in the directory that are not served, by name."""
        with self._lock:
            return sorted(self._rejected.values(), key=lambda r: r.name)

    def _reject(self, name: str, st: os.stat_result, exc: Exception) -> None:
        """Log, count and remember an invalid file, so scans do not re-read it until it changes."""
        path = self.directory / (name + SUFFIX)
        expected = isinstance(exc, (AdapterError, AdapterTooLarge, OSError))
        reason = str(exc) if expected else f"{type(exc).__name__}: {adapter_file.short_message(exc)}"
        log.error("ignoring %s in %s: %s", path.name, self.directory, reason, exc_info=None if expected else exc)
        with self._lock:
            self._rejected.pop(name, None)
            self._rejected[name] = RejectedFile(name, str(path), reason, st.st_size, st.st_mtime_ns, time.time())
            self.rejections += 1
            while len(self._rejected) > REJECTED_LIMIT:  # the oldest are forgotten, and re-read at the next scan
                del self._rejected[next(iter(self._rejected))]

    def _journal(self, entries: list[dict]) -> None:
        """Append numbered changes to the journal (fsynced); fold it into the index once long.

        Called with the exclusive lock held and the records in sync, so the numbers continue the
        shared sequence and no other process appends meanwhile."""
        lines = []
        for entry in entries:
            self._seq += 1
            lines.append(json.dumps({**entry, "seq": self._seq}, separators=(",", ":")).encode() + b"\n")
        data = b"".join(lines)
        path = self.directory / JOURNAL_NAME
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end the line a crashed writer left unfinished
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.directory)
        self._journal_ino, self._journal_offset = st.st_ino, st.st_size
        if self._seq - self._index_seq >= COMPACT_AFTER:
            self._compact()

    def _compact(self) -> None:
        """Write every record to the index, then drop the journal it now contains (exclusive lock held)."""
        with self._lock:
            index = {name: asdict(r) for name, r in self._records.items()}
        body = {"format": INDEX_FORMAT, "seq": self._seq, "adapters": index}
        st = atomic_write(self.directory / INDEX_NAME, json.dumps(body, separators=(",", ":")).encode())
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)
        _fsync_dir(self.directory)
        self._index_id, self._index_seq = (st.st_ino, st.st_size, st.st_mtime_ns), self._seq
        self._journal_ino, self._journal_offset = None, 0

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


_FIELD_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _record_of(entry: object) -> AdapterRecord | None:
    """The record an index or journal entry holds, or None if it is not one (fields and their types)."""
    if not isinstance(entry, dict) or set(entry) != {f.name for f in fields(AdapterRecord)}:
        return None
    def fits(value: object, kind: str) -> bool:
        if kind.startswith("list["):
            return isinstance(value, list) and all(fits(v, kind[5:-1]) for v in value)
        return isinstance(value, _FIELD_TYPES[kind]) and (kind == "bool" or not isinstance(value, bool))

    return AdapterRecord(**entry) if all(fits(entry[f.name], f.type) for f in fields(AdapterRecord)) else None


def _identity(record: AdapterRecord | None) -> tuple[int, str, float] | None:
    """What tells one stored version from another (a rescan's new file stat does not)."""
    return None if record is None else (record.version, record.sha256, record.created)


def _with_stat(record: AdapterRecord, st: os.stat_result) -> AdapterRecord:
    return AdapterRecord(**{**asdict(record), "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns})


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in name:
        raise AdapterError(f"archive member {name!r} points outside the archive")
    return path


class _TarStream:
    """The decompressed stream of a .tar.gz, as tarfile reads it, with what its headers may take bounded.

    tarfile reads the body of an extension header (a GNU long name or link, PAX records) whole,
    in one read of the size that header claims, before any member is seen: a 1 MiB .tar.gz can
    claim 1 GiB. It offers no limit, and checking the headers in a walk of our own would need a
    second tar parser that agrees with tarfile's on every input. So tarfile reads through this
    stream instead: apart from member data (which `extract_archive` reads itself, in chunks, after
    checking each member's size), it may read MAX_TAR_HEADER_BYTES in all, and a read that would
    pass that is refused before a byte of it is decompressed. The same budget bounds chains of
    headers and GNU sparse maps, which tarfile reads 512 bytes at a time. Seeks (tarfile skipping
    to the next header) may not pass the most a valid archive can hold.
    """

    def __init__(self, raw: gzip.GzipFile, max_bytes: int) -> None:
        self.raw = raw
        self.header_bytes = 0
        self.max_position = max_bytes + MAX_TAR_HEADER_BYTES
        self.in_member = False  # set while extract_archive reads a member's data

    def read(self, size: int = -1) -> bytes:
        if self.in_member:
            return self.raw.read(size)
        if size is None or size < 0 or self.header_bytes + size > MAX_TAR_HEADER_BYTES:
            raise AdapterTooLarge(
                f"archive's tar headers (long names, PAX records) need {self.header_bytes} + {size} bytes; "
                f"at most {MAX_TAR_HEADER_BYTES} are read"
            )
        data = self.raw.read(size)
        self.header_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset if whence == io.SEEK_CUR else None
        if target is None or target > self.max_position:
            raise AdapterTooLarge(f"archive expands beyond the limit of {self.max_position} bytes")
        return self.raw.seek(target)

    def tell(self) -> int:
        return self.raw.tell()


def _check_zip_directory(data: bytes) -> None:
    """Bound the zip central directory before zipfile parses it (it builds a ZipInfo per entry).

    The end record's entry count does not bound that parse, its directory size does, so both are
    checked. zipfile offers no public way to read the end record alone; `_EndRecData` is the
    function ZipFile itself calls when it opens an archive, so the numbers checked are the ones
    its parse will use.
    """
    end = zipfile._EndRecData(io.BytesIO(data))  # noqa: SLF001 - see above
    if end is None:
        raise AdapterError("archive is corrupt: it has no zip end-of-central-directory record")
    count, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # noqa: SLF001
    if count > MAX_ARCHIVE_MEMBERS or size > MAX_ZIP_DIRECTORY_BYTES:
        raise AdapterError(
            f"archive's central directory lists {count} members in {size} bytes; at most {MAX_ARCHIVE_MEMBERS} "
            f"members and {MAX_ZIP_DIRECTORY_BYTES} bytes are allowed"
        )


def _read_member(fh: io.BufferedIOBase, name: str, size: int) -> bytes:
    """A member's data, in chunks, never more than the `size` already checked against the limits."""
    parts, got = [], 0
    while chunk := fh.read(min(ARCHIVE_CHUNK, size + 1 - got)):
        parts.append(chunk)
        got += len(chunk)
        if got > size:
            raise AdapterTooLarge(f"archive member {name!r} expands beyond the {size} bytes its header says")
    return b"".join(parts)


ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def extract_archive(data: bytes, dest: Path, max_bytes: int) -> Path:
    """Extract a pyreft save directory from a .zip or .tar.gz, refusing anything hostile.

    Refused: absolute or '..' paths, links and device files, encrypted or oddly compressed zip
    members, more than MAX_ARCHIVE_MEMBERS members, a zip central directory over
    MAX_ZIP_DIRECTORY_BYTES, tar headers over MAX_TAR_HEADER_BYTES in all, and members or totals
    over `max_bytes` once uncompressed (zip bombs); each before the work it would cost.
    Returns the directory holding config.json.
    """
    total = 0
    members: list[tuple[PurePosixPath, bytes]] = []
    try:
        if data[:4] == b"PK\x03\x04":
            _check_zip_directory(data)
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
                    if info.flag_bits & 0x1:
                        raise AdapterError(f"archive member {info.filename!r} is encrypted; send it unencrypted")
                    if info.compress_type not in ZIP_METHODS:
                        raise AdapterError(
                            f"archive member {info.filename!r} uses zip compression method {info.compress_type}; "
                            "use deflate or none"
                        )
                    total += info.file_size
                    if info.file_size > max_bytes or total > max_bytes:
                        raise AdapterTooLarge(f"archive expands beyond the limit of {max_bytes} bytes")
                    with zf.open(info) as fh:
                        members.append((path, _read_member(fh, info.filename, info.file_size)))
        else:
            with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as raw, tarfile.open(
                fileobj=(stream := _TarStream(raw, max_bytes)), mode="r:"  # type: ignore[call-overload]
            ) as tf:
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
                    stream.in_member = True
                    try:
                        members.append((path, _read_member(fh, info.name, info.size) if fh else b""))
                    finally:
                        stream.in_member = False
    except RecursionError as exc:  # tarfile follows a chain of extension headers by recursion
        raise AdapterError("archive is corrupt: its headers are chained too deeply") from exc
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise AdapterError(f"archive is corrupt: {exc}") from exc
    configs = [p for p, _ in members if p.name == "config.json"]
    if len(configs) != 1:
        raise AdapterError("archive must hold exactly one pyreft config.json")
    root = configs[0].parent
    for path, content in members:
        if path.parent == root and (path.name == "config.json" or path.name.endswith(".bin")):
            (dest / path.name).write_bytes(content)
    return dest
