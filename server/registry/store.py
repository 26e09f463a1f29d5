"""The adapter registry: a directory that is the single source of truth, and survives restarts.

Each adapter NAME is the file NAME.safetensors (native format); a file dropped in by hand or by a
deploy tool is picked up by the next scan. Beside the files, a journaled index shared by every
server process on the directory (`shared_index`) records each file's version, sha256, size and
mtime, so a restart neither re-hashes nor re-validates files it already knows. The index is a cache
of the files: a record whose file's size or mtime no longer match is re-read and re-hashed
(`scan`); a file that fails to parse or validate is rejected alone. Uploads and pyreft archives are
parsed within this server's bounds (`archive`). A read-only replica (`read_only=True`) takes no
exclusive lock and writes nothing: it follows the others and the files.

Adapters are parsed from disk on first use and kept in a host-memory LRU keyed by (name, sha256),
bounded in bytes (`host_cache_bytes`); a request holds the parsed Adapter it resolved, so replacing
or deleting an adapter never disturbs requests already running with it.

Locking: `_write_lock` serialises, within this process, everything that reads or changes the
shared files (put, delete, scan, sync); `_lock` guards the in-memory maps for moments only, so
lookups never wait on disk, on a scan or on another process.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from server import adapter_file
from server.adapter_file import Adapter, AdapterError
from server.engine.adapter_cache import AdapterRef
from server.lru import ByteLRU
from server.model import ModelShape
from server.registry import shared_index
from server.registry.archive import AdapterParser, AdapterTooLarge
from server.registry.scan import SUFFIX, RejectedFile, RejectedFiles, adapter_files, files_differ, to_read
from server.registry.shared_index import Entries, SharedIndex, atomic_write, fsync_dir


class UnknownAdapter(KeyError):
    """No adapter of that name is registered."""


class AdapterExists(ValueError):
    """The name is taken and replace was not asked for."""


class AdapterChanged(ValueError):
    """The name no longer holds the version the caller saw (another upload or a delete came first)."""

    def __init__(self, name: str, current: AdapterRecord | None) -> None:
        super().__init__(f"adapter {name!r} changed since it was read")
        self.current = current


class ReadOnlyRegistry(PermissionError):
    """This server was started with a read-only registry: it serves and scans, never writes."""


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


class Registry:
    def __init__(
        self, directory: Path, base: ModelShape, *, max_rank: int, max_adapter_bytes: int, read_only: bool = False,
        host_cache_bytes: int = 1 << 30, max_interventions: int = adapter_file.MAX_INTERVENTIONS,
        serving_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.directory = Path(directory)
        self.parser = AdapterParser(base, max_rank, max_adapter_bytes, max_interventions, serving_dtype)
        self.read_only = read_only
        self._records: dict[str, AdapterRecord] = {}
        self._sorted: list[str] | None = None  # names in order, rebuilt after a change for paging
        self._parsed: ByteLRU[tuple[str, str], Adapter] = ByteLRU(host_cache_bytes, host_nbytes)
        self._rejected = RejectedFiles()  # files that failed validation, until they change
        self._shared = SharedIndex(self.directory, read_only)
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self.on_removed: list[Callable[[str], None]] = []  # told of every adapter removed or replaced

    @property
    def max_rank(self) -> int:
        return self.parser.max_rank

    @property
    def max_adapter_bytes(self) -> int:
        return self.parser.max_adapter_bytes

    @property
    def host_cache_bytes(self) -> int:
        return self._parsed.budget_bytes

    @property
    def rejections(self) -> int:
        """Files rejected since start-up (a file is counted again only once it changed)."""
        return self._rejected.count

    # ---- start-up and scanning --------------------------------------------------------------

    def open(self) -> float:
        """Read the index and the directory, then (unless read-only) fold the journal into the index."""
        start = time.perf_counter()
        if self.read_only:
            if not self.directory.is_dir():
                raise FileNotFoundError(f"the read-only registry {self.directory} does not exist")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            shared_index.remove_stale_tmp(self.directory)
        with self._write_lock:
            with self._shared.lock(exclusive=not self.read_only):
                self._adopt(self._shared.reload(), whole=True)
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
            if files_differ(self.directory, self._records, self._rejected):
                if self.read_only:
                    changed += self._scan(journal=False)
                else:
                    with self._shared.lock(exclusive=True):
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

    def _follow(self) -> list[str]:
        if not self._shared.changed():
            return []
        with self._shared.lock(exclusive=False):
            return self._sync()

    def _sync(self) -> list[str]:
        """Apply what others wrote since we last read (a lock is held)."""
        changes = self._shared.sync()
        return [] if changes is None else self._adopt(*changes)

    def _adopt(self, entries: Entries, whole: bool) -> list[str]:
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

    def _scan(self, journal: bool) -> list[str]:
        present = {name: st for name, st in adapter_files(self.directory) if st is not None}
        records = self._records  # only this thread changes it while the write lock is held
        self._rejected.keep_only(present)
        updates: dict[str, AdapterRecord | None] = {name: None for name in records if name not in present}
        parsed: list[tuple[str, str, Adapter]] = []
        for name in to_read(present, records, self._rejected):
            st, record = present[name], records.get(name)
            try:
                adapter_file.validate_name(name)
                data = self.parser.read(self.directory / (name + SUFFIX), st.st_size)
                adapter = self.parser.parse(data)
            except Exception as exc:  # noqa: BLE001 - whatever one file does, it is rejected alone
                self._rejected.reject(self.directory / (name + SUFFIX), name, st, exc)
                if record:
                    updates[name] = None
                continue
            self._rejected.forget(name)
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

    def rejected(self) -> list[RejectedFile]:
        """The files in the directory that are not served, by name."""
        return self._rejected.listed()

    def host_resident(self) -> list[str]:
        """The names of the adapter versions parsed in host memory, least recently used first: a
        snapshot that other threads (the metrics) may take at any time."""
        with self._lock:
            return [name for name, _ in self._parsed]

    def cached(self, name: str) -> AdapterRef | None:
        """Pin the current version of `name` if it is parsed already (no disk, no torch); else None."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                return None
            adapter = self._parsed.get((name, record.sha256))
            if adapter is None:
                return None
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
            data = self.parser.read(self.directory / (name + SUFFIX), record.file_size)
        except (OSError, AdapterTooLarge):  # gone, replaced by something else, or grown past the limit
            data = b""
        sha = adapter_file.sha256(data)
        if sha != record.sha256:  # changed or removed on disk since the last scan
            if not _retry:
                raise AdapterError(f"the file of {name!r} is changing on disk; retry shortly")
            self.scan()
            return self.resolve(name, _retry=False)
        adapter = self.parser.parse(data)
        with self._lock:
            self._parsed.put((name, sha), adapter)
        return AdapterRef(name, record.version, adapter, sha)

    # ---- writes -----------------------------------------------------------------------------

    def parse_upload(self, data: bytes, positions: str | None, share_weights: bool) -> Adapter:
        """A validated Adapter from uploaded bytes: native safetensors, or a pyreft .zip/.tar.gz."""
        return self.parser.upload(data, positions, share_weights)

    def parse_path(self, path: Path, positions: str | None, share_weights: bool) -> Adapter:
        """A validated Adapter from a native file or a pyreft save directory the server can read."""
        return self.parser.path(path, positions, share_weights)

    def put(
        self, name: str, adapter: Adapter, replace: bool, expected: AdapterRecord | None | Literal["any"] = "any"
    ) -> AdapterRecord:
        """Store `adapter` as the new current version of `name`, atomically.

        `expected`, when given, is the record the caller read earlier (None: the name was free); if
        any replica has uploaded or deleted the name since, AdapterChanged is raised and nothing written.
        """
        self._check_writable()
        adapter_file.validate_name(name)
        adapter_file.check_count(len(adapter.interventions), self.parser.max_interventions)
        adapter_file.check_range(adapter, self.parser.serving_dtype)
        data = adapter_file.to_bytes(adapter)
        sha = adapter_file.sha256(data)
        with self._write_lock, self._shared.lock(exclusive=True):
            changed = self._sync()
            old = self._records.get(name)
            if expected != "any" and _identity(old) != _identity(expected):
                raise AdapterChanged(name, old)
            if old is not None and not replace:
                raise AdapterExists(f"adapter {name!r} exists (version {old.version}); pass replace=true to replace it")
            st = atomic_write(self.directory / (name + SUFFIX), data)
            record = _record(name, old.version + 1 if old else 1, sha, adapter, len(data), st)
            self._rejected.forget(name)
            self._apply({name: record}, [(name, sha, adapter)])
            self._journal([{"put": asdict(record)}])
        for changed_name in dict.fromkeys([*changed, *([name] if old is not None else [])]):
            self._notify(changed_name)
        return record

    def delete(self, name: str) -> None:
        self._check_writable()
        with self._write_lock, self._shared.lock(exclusive=True):
            changed = self._sync()
            self.get(name)
            (self.directory / (name + SUFFIX)).unlink(missing_ok=True)
            fsync_dir(self.directory)
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
                    self._parsed.pop((name, old.sha256))
                if record is None:
                    self._records.pop(name, None)
                else:
                    self._records[name] = record
            self._sorted = None
            for name, sha, adapter in parsed:
                self._parsed.put((name, sha), adapter)

    def _journal(self, entries: list[dict]) -> None:
        """Append changes to the shared journal; fold it into the index once long (exclusive lock held)."""
        self._shared.append(entries)
        if self._shared.compaction_due:
            self._compact()

    def _compact(self) -> None:
        """Write every record to the shared index (exclusive lock held)."""
        with self._lock:
            records = {name: asdict(r) for name, r in self._records.items()}
        self._shared.compact(records)

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
