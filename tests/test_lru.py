"""The byte-bounded LRU that the host and device adapter caches share, and the device cache's use of
it: pinned adapters and the one just loaded stay, residency is read as a snapshot. No model."""

from __future__ import annotations

import torch

from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.lru import ByteLRU
from tests.test_registry import random_loreft


def test_evicts_least_recently_used_until_under_budget():
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    assert lru.put("a", b"1234") == [] and lru.put("b", b"1234") == []
    assert lru.get("a") == b"1234"  # now b is the least recently used
    assert lru.put("c", b"1234") == ["b"]
    assert list(lru) == ["a", "c"] and lru.nbytes == 8
    assert lru.put("a", b"12") == [] and lru.nbytes == 6 and list(lru) == ["c", "a"]  # replaced, bytes follow
    assert lru.pop("c") == b"1234" and lru.nbytes == 2 and lru.pop("c") is None


def test_keep_spares_entries_over_the_budget_and_a_zero_budget_keeps_nothing():
    lru: ByteLRU[str, bytes] = ByteLRU(4, len)
    lru.put("pinned", b"1234")
    assert lru.put("new", b"1234", keep=lambda k: k in ("pinned", "new")) == []
    assert lru.nbytes == 8 > lru.budget_bytes
    empty: ByteLRU[str, bytes] = ByteLRU(0, len)
    assert empty.put("a", b"1") == ["a"] and not empty and empty.nbytes == 0


def ref(name: str, seed: int) -> AdapterRef:
    return AdapterRef(name, 1, random_loreft([2, 5], 4, seed), sha256=f"sha{seed}")


def test_device_cache_keeps_pinned_and_reports_residency():
    one = DeviceAdapterCache(torch.device("cpu"), torch.float32, 1 << 30, set()).get(ref("x", 0)).nbytes
    loads: list[float] = []
    cache = DeviceAdapterCache(torch.device("cpu"), torch.float32, 2 * one, {"p"})
    cache.on_load.append(loads.append)
    cache.get(ref("p", 1))
    cache.get(ref("a", 2))
    cache.get(ref("b", 3))  # over budget: a goes, p is pinned
    assert cache.resident() == [("p", True), ("b", False)] and cache.nbytes == 2 * one
    cache.get(ref("b", 3))
    assert len(loads) == 3 and all(s > 0 for s in loads) and (cache.hits, cache.misses) == (1, 3)
    cache.drop("b")
    assert cache.resident() == [("p", True)] and cache.nbytes == one
