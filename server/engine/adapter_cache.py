"""Device-resident adapters: their interventions in common form, on the model's device and dtype.

An LRU under a byte budget (`server.lru.ByteLRU`, shared with the registry's host cache). Pinned
adapter names are never evicted. A request's adapter is identified by (name, sha256), so a
replaced adapter's old version stays usable by the requests that pinned it while the new version
is loaded beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.adapter_file import ServedAdapter
from server.interventions import CommonForm, common_form
from server.lru import ByteLRU


@dataclass(frozen=True)
class AdapterRef:
    """The adapter version a request pinned when it was accepted (one adapter, or a composition)."""

    name: str
    version: int
    adapter: ServedAdapter = field(compare=False, repr=False)
    sha256: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """Content-addressed, so a deleted then re-uploaded name never hits stale device tensors."""
        return (self.name, self.sha256)


@dataclass(frozen=True)
class ResidentAdapter:
    adapter: ServedAdapter
    forms: tuple[CommonForm, ...]
    nbytes: int


class DeviceAdapterCache:
    def __init__(self, device: torch.device, dtype: torch.dtype, budget_bytes: int, pinned: set[str]) -> None:
        self.device, self.dtype, self.pinned = device, dtype, set(pinned)
        self._entries: ByteLRU[tuple[str, str], ResidentAdapter] = ByteLRU(budget_bytes, lambda e: e.nbytes)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the engine thread reads; registry changes drop from other threads
        self.on_load: list[Callable[[float], None]] = []  # told the seconds each load onto the device took

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes

    @property
    def budget_bytes(self) -> int:
        return self._entries.budget_bytes

    def resident(self) -> list[tuple[str, bool]]:
        """(name, pinned) of each resident adapter version, least recently used first: a snapshot
        that other threads (the metrics) may take while the engine thread loads and evicts."""
        with self._lock:
            return [(name, name in self.pinned) for name, _ in self._entries]

    def get(self, ref: AdapterRef) -> ResidentAdapter:
        """The adapter's device forms, loading them (and evicting LRU entries) on a miss."""
        with self._lock:
            entry = self._entries.get(ref.key)
            if entry is not None:
                self.hits += 1
                return entry
        start = time.perf_counter()
        forms = tuple(common_form(iv).to(self.device, self.dtype) for iv in ref.adapter.interventions)
        entry = ResidentAdapter(ref.adapter, forms, sum(f.nbytes for f in forms))
        seconds = time.perf_counter() - start
        with self._lock:
            self.misses += 1
            self._entries.put(ref.key, entry, keep=lambda key: key == ref.key or key[0] in self.pinned)
        for callback in self.on_load:
            callback(seconds)
        return entry

    def drop(self, name: str) -> None:
        """Forget every resident version of `name` (after a delete or replace); pinned requests
        reload their version from the Adapter they hold if they still need it."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == name]:
                self._entries.pop(key)
