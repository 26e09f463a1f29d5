"""The adapter registry, in four units: `store` (the Registry: records, host cache, put/delete/resolve),
`shared_index` (the journaled index many processes share), `scan` (the directory scan and the files
it rejects) and `archive` (upload and pyreft archive parsing). The host cache is a `server.lru.ByteLRU`,
the same LRU as the device adapter cache's."""

from server.registry.archive import MAX_ARCHIVE_MEMBERS, AdapterParser, AdapterTooLarge, extract_archive
from server.registry.scan import SUFFIX, RejectedFile
from server.registry.shared_index import (
    HOST,
    INDEX_NAME,
    JOURNAL_NAME,
    LOCK_NAME,
    STALE_TMP_SECONDS,
    atomic_write,
    read_index,
)
from server.registry.store import (
    AdapterChanged,
    AdapterExists,
    AdapterRecord,
    ReadOnlyRegistry,
    Registry,
    UnknownAdapter,
    host_nbytes,
)

__all__ = [
    "HOST", "INDEX_NAME", "JOURNAL_NAME", "LOCK_NAME", "MAX_ARCHIVE_MEMBERS", "STALE_TMP_SECONDS", "SUFFIX",
    "AdapterChanged", "AdapterExists", "AdapterParser", "AdapterRecord", "AdapterTooLarge", "ReadOnlyRegistry",
    "Registry", "RejectedFile", "UnknownAdapter", "atomic_write", "extract_archive", "host_nbytes", "read_index",
]
