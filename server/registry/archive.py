"""Upload and archive parsing: adapter bytes from an upload, a file or a pyreft save, validated
against this server's bounds before anything is kept.

A pyreft save arrives as a .zip or .tar.gz; `extract_archive` refuses anything hostile (paths out of
the archive, links, bombs, oversized headers) before the work it would cost.
"""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from server import adapter_file
from server.adapter_file import Adapter, AdapterError
from server.model import ModelShape

MAX_ARCHIVE_MEMBERS = 256
MAX_ZIP_DIRECTORY_BYTES = MAX_ARCHIVE_MEMBERS * 1024  # a pyreft save's entries take about 100 bytes each
MAX_TAR_HEADER_BYTES = 1 << 20  # all a tar may take outside member data: headers, long names, PAX records
ARCHIVE_CHUNK = 1 << 16


class AdapterTooLarge(ValueError):
    """An upload, file or archive member over the configured size limit."""


@dataclass(frozen=True)
class AdapterParser:
    """This server's bounds on an adapter, and the readers that apply them."""

    base: ModelShape
    max_rank: int
    max_adapter_bytes: int
    max_interventions: int
    serving_dtype: torch.dtype  # adapters that can overflow it are refused (adapter_file.check_range)

    def upload(self, data: bytes, positions: str | None, share_weights: bool) -> Adapter:
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
        return self.parse(data)

    def path(self, path: Path, positions: str | None, share_weights: bool) -> Adapter:
        """A validated Adapter from a native file or a pyreft save directory the server can read."""
        if path.is_dir():
            if not positions:
                raise AdapterError("a pyreft directory needs 'positions' (e.g. f3+l3): pyreft does not record them")
            total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            if total > self.max_adapter_bytes:
                raise AdapterTooLarge(f"{path} holds {total} bytes; the limit is {self.max_adapter_bytes}")
            return adapter_file.import_pyreft(path, positions, share_weights, self.base, self.max_rank,
                                              self.max_interventions)
        return self.parse(self.read(path, path.stat().st_size))

    def read(self, path: Path, size: int) -> bytes:
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

    def parse(self, data: bytes) -> Adapter:
        """A validated Adapter from native bytes, within this server's bounds and serving dtype."""
        adapter = adapter_file.loads(data, self.base, self.max_rank, self.max_interventions)
        adapter_file.check_range(adapter, self.serving_dtype)
        return adapter


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
