"""The journaled index that many server processes share: what each adapter file holds, without reading it.

Files in the registry directory:
    .registry.json       {"format": 2, "seq": S, "adapters": name -> record}, so a restart neither
                         re-hashes nor re-validates files it already knows
    .registry.journal    one JSON line per change since .registry.json was written, numbered by
                         "seq", so an upload or delete appends a line instead of rewriting the
                         index of every adapter; folded into .registry.json at start-up and every
                         COMPACT_AFTER lines
    .registry.lock       the lock file that makes the directory safe for many server processes

Many processes, on one host or on many (a ReadWriteMany volume), may serve one directory. Every
change happens under an exclusive `flock` of .registry.lock, after bringing this process's records
up to the shared index and journal, so versions are assigned from the true current state and never
twice. Readers take the lock shared, and only when the index or journal changed on disk (two stats
otherwise). Journal lines carry consecutive sequence numbers, so a reader tailing the journal
notices a compaction or a gap and re-reads the index. A line or record that cannot be read is
skipped, never fatal.

Every file is written to a temporary file that is fsynced, then renamed over its target, then the
directory is fsynced: a crash at any moment leaves the old version or the new one. A temporary
file is named after the host and process that writes it; start-up removes only those of dead
processes on this host, and any older than STALE_TMP_SECONDS (another host's process cannot be
asked).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_NAME = ".registry.json"
JOURNAL_NAME = ".registry.journal"
LOCK_NAME = ".registry.lock"
INDEX_FORMAT = 2
COMPACT_AFTER = 1000  # journal lines before the index is rewritten whole
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 15 * 60  # a temporary file this old is a crash's leftover, whoever wrote it
HOST = socket.gethostname().replace("/", "_") or "localhost"

Entries = dict[str, dict | None]  # name -> its record as stored, or None: deleted


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)
    return path.stat()


def remove_stale_tmp(directory: Path) -> None:
    """Remove temporary files of crashed writers: dead processes of this host, or any old enough."""
    now = time.time()
    for path in directory.glob(TMP_PREFIX + "*"):
        host, _, pid = path.name[len(TMP_PREFIX):].rpartition("-")[0].rpartition("-")  # HOST-PID-random
        dead = host == HOST and pid.isdigit() and not _pid_alive(int(pid))
        try:
            old = now - path.stat().st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:
            continue
        if dead or old:
            path.unlink(missing_ok=True)


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


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another without reading it: inode, size, mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_index(directory: Path) -> tuple[Entries, int, tuple[int, int, int] | None]:
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


def _read_journal(directory: Path) -> tuple[int | None, bytes]:
    try:
        with open(directory / JOURNAL_NAME, "rb") as fh:
            return os.fstat(fh.fileno()).st_ino, fh.read()
    except FileNotFoundError:
        return None, b""


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


def replay(data: bytes, seq: int, into: Entries, *, follow: bool) -> tuple[int, int] | None:
    """Apply to `into` the journal lines of `data` numbered after `seq` (lines without a number too).

    `follow`: `data` is the tail of a journal this process has read up to `seq`, so the next line
    must be numbered seq + 1; a larger number is a gap (the journal was replaced) and returns None.
    Otherwise `data` is a whole journal read over an index folded up to `seq`. Returns the last
    number applied and the bytes of complete lines consumed."""
    consumed = 0
    for end, entry in _journal_lines(data):
        consumed = end
        if entry is None:
            continue
        number = entry.get("seq")
        if number is not None:
            if follow and number > seq + 1:
                return None
            if number <= seq:
                continue
            seq = number
        put = entry.get("put")
        if isinstance(put, dict) and isinstance(put.get("name"), str):
            into[put["name"]] = put
        else:
            into[entry["delete"]] = None
    return seq, consumed


def read_index(directory: Path) -> dict[str, dict]:
    """The records as last written: the index, with the journal's later changes replayed over it."""
    index, seq, _ = _load_index(directory)
    replay(_read_journal(directory)[1], seq, index, follow=False)
    return {name: entry for name, entry in index.items() if entry is not None}


class SharedIndex:
    """This process's view of the shared index and journal: how far it has read them, and its writes.

    Callers hold `lock` for every call but `changed`, shared to read and exclusive to write."""

    def __init__(self, directory: Path, read_only: bool) -> None:
        self.directory = directory
        self.read_only = read_only
        self.seq = 0  # the last journal number this process has read or written
        self._index_id: tuple[int, int, int] | None = None
        self._index_seq = 0
        self._journal_ino: int | None = None
        self._journal_offset = 0

    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
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

    def changed(self) -> bool:
        """Whether another process has written since this one last read (two stats, no lock)."""
        if _file_id(self.directory / INDEX_NAME) != self._index_id:
            return True
        journal = _file_id(self.directory / JOURNAL_NAME)
        if journal is None:
            return self._journal_offset != 0
        return journal[0] != self._journal_ino or journal[1] != self._journal_offset

    def reload(self) -> Entries:
        """Every record: the index and the whole journal, read afresh."""
        index, index_seq, index_id = _load_index(self.directory)
        ino, data = _read_journal(self.directory)
        replayed = replay(data, index_seq, index, follow=False)
        assert replayed is not None  # only a followed tail can have a gap
        seq, consumed = replayed
        self._index_id, self._index_seq = index_id, index_seq
        self._journal_ino, self._journal_offset, self.seq = ino, consumed, seq
        return index

    def sync(self) -> tuple[Entries, bool] | None:
        """What the others changed since this process last read: (entries, whether they are every
        record, as after a compaction, or only the changes); None if nothing changed."""
        if not self.changed():
            return None
        if _file_id(self.directory / INDEX_NAME) != self._index_id:
            return self.reload(), True  # compacted (or first read)
        try:
            with open(self.directory / JOURNAL_NAME, "rb") as fh:
                st = os.fstat(fh.fileno())
                if (st.st_ino != self._journal_ino and self._journal_offset) or st.st_size < self._journal_offset:
                    return self.reload(), True
                fh.seek(self._journal_offset)
                data = fh.read()
        except FileNotFoundError:
            return self.reload(), True
        changes: Entries = {}
        followed = replay(data, self.seq, changes, follow=True)
        if followed is None:
            return self.reload(), True  # a gap: the journal we followed was replaced
        self.seq, consumed = followed
        self._journal_ino, self._journal_offset = st.st_ino, self._journal_offset + consumed
        return changes, False

    def append(self, entries: list[dict]) -> None:
        """Append numbered changes to the journal, fsynced (exclusive lock held, records in sync, so the
        numbers continue the shared sequence and no other process appends meanwhile)."""
        lines = []
        for entry in entries:
            self.seq += 1
            lines.append(json.dumps({**entry, "seq": self.seq}, separators=(",", ":")).encode() + b"\n")
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
            fsync_dir(self.directory)
        self._journal_ino, self._journal_offset = st.st_ino, st.st_size

    @property
    def compaction_due(self) -> bool:
        return self.seq - self._index_seq >= COMPACT_AFTER

    def compact(self, records: dict[str, dict]) -> None:
        """Write every record to the index, then drop the journal it now contains (exclusive lock held)."""
        body = {"format": INDEX_FORMAT, "seq": self.seq, "adapters": records}
        st = atomic_write(self.directory / INDEX_NAME, json.dumps(body, separators=(",", ":")).encode())
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)
        fsync_dir(self.directory)
        self._index_id, self._index_seq = (st.st_ino, st.st_size, st.st_mtime_ns), self.seq
        self._journal_ino, self._journal_offset = None, 0
