"""Memory that grows with adapters or requests is bounded: host adapter cache in bytes, the
rejected-file set pruned and capped, metrics labels capped."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.adapter_file import Adapter
from server.metrics import Metrics
from server.registry import Registry, host_nbytes
from server.registry import scan as registry_scan
from tests.test_registry import SHAPE, variant
from tests.test_registry import emoji as emoji_adapter


@pytest.fixture(scope="module")
def emoji() -> Adapter:
    return emoji_adapter()


def open_registry(path: Path, host_cache_bytes: int) -> Registry:
    reg = Registry(path, SHAPE, max_rank=64, max_adapter_bytes=1 << 24, host_cache_bytes=host_cache_bytes)
    reg.open()
    return reg


def test_host_cache_is_bounded_in_bytes(tmp_path, emoji):
    one = host_nbytes(emoji)
    assert one > 0
    reg = open_registry(tmp_path, host_cache_bytes=int(2.5 * one))
    for i in range(6):
        reg.put(f"a{i}", variant(emoji, i), replace=False)
        assert reg._parsed.nbytes <= reg.host_cache_bytes
        assert reg._parsed.nbytes == sum(host_nbytes(a) for a in reg._parsed.values())
    assert [name for name, _ in reg._parsed] == ["a4", "a5"]
    assert reg.cached("a0") is None
    ref = reg.resolve("a0")  # evicted, so read again from disk: still served, and now the newest entry
    assert ref.adapter.interventions[0].tensors["bias"].equal(variant(emoji, 0).interventions[0].tensors["bias"])
    assert [name for name, _ in reg._parsed] == ["a5", "a0"]


def test_host_cache_forgets_replaced_and_deleted_versions(tmp_path, emoji):
    reg = open_registry(tmp_path, host_cache_bytes=1 << 30)
    reg.put("a", emoji, replace=False)
    reg.put("a", variant(emoji, 1.0), replace=True)
    assert len(reg._parsed) == 1 and reg._parsed.nbytes == host_nbytes(emoji)
    reg.delete("a")
    assert not reg._parsed and reg._parsed.nbytes == 0


def test_zero_host_cache_still_serves(tmp_path, emoji):
    reg = open_registry(tmp_path, host_cache_bytes=0)
    reg.put("a", emoji, replace=False)
    assert not reg._parsed and reg.cached("a") is None
    assert reg.resolve("a").name == "a"


def test_rejected_files_are_forgotten_when_removed_and_capped(tmp_path, monkeypatch):
    reg = open_registry(tmp_path, host_cache_bytes=1 << 30)
    for i in range(10):
        (tmp_path / f"bad{i}.safetensors").write_bytes(b"not an adapter")
    reg.scan()
    assert len(reg._rejected) == 10
    for i in range(6):
        (tmp_path / f"bad{i}.safetensors").unlink()
    reg.scan()
    assert sorted(reg._rejected) == [f"bad{i}" for i in range(6, 10)]
    monkeypatch.setattr(registry_scan, "REJECTED_LIMIT", 3)
    for i in range(10, 20):
        (tmp_path / f"bad{i}.safetensors").write_bytes(b"still not an adapter")
    reg.scan()
    assert len(reg._rejected) == 3
    assert len(reg) == 0


def test_metric_labels_stay_under_the_cap_for_any_number_of_adapters():
    metrics = Metrics(max_adapter_labels=10)
    for i in range(500):
        label = metrics.adapter_label(f"adapter-{i}")
        metrics.requests.labels("completions", label, "200").inc()
        metrics.prompt_tokens.labels(label).inc(3)
        metrics.latency.labels(label).observe(0.1)
        metrics.ttft.labels(label).observe(0.01)
    assert len(metrics._labels) == 10
    seen: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if "adapter" in sample.labels:
                seen.add(sample.labels["adapter"])
    assert seen == {f"adapter-{i}" for i in range(10)} | {"other"}
