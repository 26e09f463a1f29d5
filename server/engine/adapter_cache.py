"""Device-resident adapters: their interventions in common form, on the model's device and dtype.

An LRU under a byte budget. Pinned adapter names are never evicted. A request's adapter is
identified by (name, version), so a replaced adapter's old version stays usable by the
requests that pinned it while the new version is loaded beside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server.adapter_file import Adapter
from server.interventions import CommonForm, common_form


@dataclass(frozen=True)
class AdapterRef:
    """The adapter version a request pinned when it was accepted."""

    name: str
    version: int
    adapter: Adapter = field(compare=False, repr=False)
    sha256: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """Content-addressed, so a deleted then re-uploaded name never hits stale device tensors."""
        return (self.name, self.sha256)


@dataclass(frozen=True)
class ResidentAdapter:
    adapter: Adapter
    forms: tuple[CommonForm, ...]
    nbytes: int


class DeviceAdapterCache:
    def __init__(self, device: torch.device, dtype: torch.dtype, budget_bytes: int, pinned: set[str]) -> None:
        self.device, self.dtype, self.budget_bytes, self.pinned = device, dtype, budget_bytes, set(pinned)
        self._entries: OrderedDict[tuple[str, str], ResidentAdapter] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the engine thread reads; registry changes drop from other threads

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def get(self, ref: AdapterRef) -> ResidentAdapter:
        """The adapter's device forms, loading them (and evicting LRU entries) on a miss."""
        with self._lock:
            entry = self._entries.get(ref.key)
            if entry is not None:
                self.hits += 1
                self._entries.move_to_end(ref.key)
                return entry
        forms = tuple(common_form(iv).to(self.device, self.dtype) for iv in ref.adapter.interventions)
        entry = ResidentAdapter(ref.adapter, forms, sum(f.nbytes for f in forms))
        with self._lock:
            self.misses += 1
            self._entries[ref.key] = entry
            self.nbytes += entry.nbytes
            self._evict(keep=ref.key)
        return entry

    def drop(self, name: str) -> None:
        """Forget every resident version of `name` (after a delete or replace); pinned requests
        reload their version from the Adapter they hold if they still need it."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == name]:
                self.nbytes -= self._entries.pop(key).nbytes

    def _evict(self, keep: tuple[str, str]) -> None:
        for key in list(self._entries):
            if self.nbytes <= self.budget_bytes:
                return
            if key == keep or key[0] in self.pinned:
                continue
            self.nbytes -= self._entries.pop(key).nbytes
