"""A least-recently-used map bounded in bytes, for the host and the device adapter caches.

Written here rather than taken from cachetools (whose `LRUCache(getsizeof=...)` bounds bytes too)
because both caches need what it refuses: the device cache keeps the entry it just loaded and the
pinned adapters even while over its budget (cachetools raises on a value over the budget and can
protect no entry), and the host cache must be able to keep nothing at a budget of 0.

Not thread-safe: each cache guards its map with its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries in use order (least recent first); `nbytes` is the sum of `size(value)` over them."""

    def __init__(self, budget_bytes: int, size: Callable[[V], int]) -> None:
        self.budget_bytes = budget_bytes
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def values(self) -> list[V]:
        return list(self._entries.values())

    def get(self, key: K) -> V | None:
        """The value, marked most recently used; None if absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, keep: Callable[[K], bool] = lambda key: False) -> list[K]:
        """Insert (or replace) as most recently used, then evict the least recently used while over
        the budget, sparing the keys `keep` names. Returns the keys evicted."""
        self.pop(key)
        self._entries[key] = value
        self.nbytes += self._size(value)
        evicted = []
        for old in list(self._entries):
            if self.nbytes <= self.budget_bytes:
                break
            if not keep(old):
                evicted.append(old)
                self.nbytes -= self._size(self._entries.pop(old))
        return evicted

    def pop(self, key: K) -> V | None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.nbytes -= self._size(value)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
