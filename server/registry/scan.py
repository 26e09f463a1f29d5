"""The directory scan: which adapter files are there, which changed since they were read, and the
files rejected until they change.

A file in the directory may have been written by any tool, so each is judged alone: its size from
`stat` before a byte is read, then any failure to parse or validate it rejects that file only. A
rejected file is logged, counted, listed (for the admin's `GET /v1/adapters/-/rejected`) and not
read again until its size or mtime change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server import adapter_file
from server.adapter_file import AdapterError
from server.registry.archive import AdapterTooLarge

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
REJECTED_LIMIT = 4096  # remembered invalid files; one forgotten is only re-validated at the next scan


class KnownFile(Protocol):
    """What a scan compares with a file's `stat` to tell whether it changed since it was read."""

    @property
    def file_size(self) -> int: ...

    @property
    def file_mtime_ns(self) -> int: ...


def adapter_files(directory: Path) -> Iterator[tuple[str, os.stat_result | None]]:
    """(adapter name, its file's stat, or None if it was removed meanwhile) for each NAME.safetensors:
    regular files only, not links, not hidden."""
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file(
                follow_symlinks=False
            ):
                try:
                    yield entry.name[: -len(SUFFIX)], entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    yield entry.name[: -len(SUFFIX)], None


def unchanged(known: KnownFile | None, st: os.stat_result) -> bool:
    return known is not None and (known.file_size, known.file_mtime_ns) == (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class RejectedFile:
    """A file in the directory that is not served, and why (for the log, the metrics and the admin)."""

    name: str
    path: str
    reason: str
    file_size: int
    file_mtime_ns: int
    when: float

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "reason": self.reason, "size": self.file_size,
                "when": self.when}


class RejectedFiles:
    """The invalid files, oldest first, at most REJECTED_LIMIT; and how many were rejected since start-up
    (a file is counted again only once it changed)."""

    def __init__(self) -> None:
        self._files: dict[str, RejectedFile] = {}
        self.count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._files))

    def get(self, name: str) -> RejectedFile | None:
        return self._files.get(name)

    def listed(self) -> list[RejectedFile]:
        with self._lock:
            return sorted(self._files.values(), key=lambda r: r.name)

    def reject(self, path: Path, name: str, st: os.stat_result, exc: Exception) -> None:
        """Log, count and remember an invalid file, so scans do not re-read it until it changes."""
        expected = isinstance(exc, (AdapterError, AdapterTooLarge, OSError))
        reason = str(exc) if expected else f"{type(exc).__name__}: {adapter_file.short_message(exc)}"
        log.error("ignoring %s in %s: %s", path.name, path.parent, reason, exc_info=None if expected else exc)
        with self._lock:
            self._files.pop(name, None)
            self._files[name] = RejectedFile(name, str(path), reason, st.st_size, st.st_mtime_ns, time.time())
            self.count += 1
            while len(self._files) > REJECTED_LIMIT:  # the oldest are forgotten, and re-read at the next scan
                del self._files[next(iter(self._files))]

    def forget(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)

    def keep_only(self, present: Mapping[str, object]) -> None:
        """Forget the files removed from the directory."""
        with self._lock:
            for name in [n for n in self._files if n not in present]:
                del self._files[name]


def files_differ(directory: Path, records: Mapping[str, KnownFile], rejected: RejectedFiles) -> bool:
    """Whether the directory holds anything the records (and the rejected files) do not say: a look
    that reads no file."""
    seen = rejected_seen = 0
    for name, st in adapter_files(directory):
        if st is None:
            return True  # removed meanwhile
        record = records.get(name)
        if record is not None:
            seen += 1
            if not unchanged(record, st):
                return True
        elif not unchanged(rejected.get(name), st):
            return True
        else:
            rejected_seen += 1
    return seen != len(records) or rejected_seen != len(rejected)


def to_read(present: Mapping[str, os.stat_result], records: Mapping[str, KnownFile],
            rejected: RejectedFiles) -> list[str]:
    """The present files that changed since they were read or rejected, or were never read."""
    return [name for name, st in present.items()
            if not unchanged(records.get(name), st) and not unchanged(rejected.get(name), st)]
