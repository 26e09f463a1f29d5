"""Prometheus metrics: our own `reft_*` families, and the vLLM-named gauges that the Kubernetes
Gateway API Inference Extension's endpoint picker reads (queue, running, cache use, adapters),
so replicas can sit in an InferencePool with adapter affinity and no custom code.

Adapter labels are bounded: the first `max_adapter_labels` adapters seen keep their name, any
later one is counted as "other", so a registry of 10,000 adapters cannot blow up cardinality.
The same bound holds for the residency gauge `vllm:lora_adapter_loaded{adapter_name,level,pinned}`
that the llm-d router's `lora-load-state` scorer reads: level `gpu` is the device adapter cache,
`cpu` the registry's host cache of parsed adapters; its value is the number of resident versions
under that label (1, or more for "other", or for a replaced adapter whose old version is still held).
`vllm:lora_requests_info` lists at most that many running and as many waiting adapter names (the
endpoint picker needs names there, in vLLM's comma-separated form); deployments that want the
names private set REFT_METRICS_KEY.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.loop import EngineStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
ADAPTER_LOAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BASE_LABEL = "base"
OTHER_LABEL = "other"
UNKNOWN_LABEL = "unknown"  # refused before the request named its adapter


class EngineView:
    """What the engine-state gauges read at scrape time (filled in once the model is loaded)."""

    engine: Callable[[], EngineStats] = staticmethod(lambda: EngineStats())
    max_batch_size: int = 1
    resident_adapters: Callable[[], int] = staticmethod(lambda: 0)
    gpu_adapters: Callable[[], list[tuple[str, bool]]] = staticmethod(lambda: [])  # (name, pinned), a snapshot
    cpu_adapters: Callable[[], list[str]] = staticmethod(lambda: [])  # names, a snapshot
    registered_adapters: Callable[[], int] = staticmethod(lambda: 0)
    rejected_files: Callable[[], int] = staticmethod(lambda: 0)
    rejections: Callable[[], int] = staticmethod(lambda: 0)
    max_lora: int = 0
    adapter_cache_hits: Callable[[], int] = staticmethod(lambda: 0)
    adapter_cache_misses: Callable[[], int] = staticmethod(lambda: 0)
    grammar_compiles: Callable[[], int] = staticmethod(lambda: 0)
    grammar_compile_seconds: Callable[[], float] = staticmethod(lambda: 0.0)
    prefix_caching: bool = False
    block_size: int = 0  # tokens per block: the prefix cache's, or the KV cache's when the prefix cache is off
    num_blocks: int = 0  # blocks of that size the KV cache holds


class _EngineCollector(Collector):
    def __init__(self, view: EngineView, max_listed: int, label: Callable[[str], str]) -> None:
        self.view = view
        self.max_listed = max_listed
        self.label = label
        self._lora_lock = threading.Lock()
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_since = 0.0

    def _lora_info(self, stats: EngineStats) -> tuple[tuple[str, str, str], float]:
        """The adapters running and waiting, and when that last changed (not when it was scraped).

        The router keeps the series with the highest value, as vLLM stamps each new combination
        with its creation time. A change is stamped when a scrape first sees it, so at most one
        scrape interval late."""
        labels = (",".join(stats.running_adapters[: self.max_listed]),
                  ",".join(stats.waiting_adapters[: self.max_listed]), str(self.view.max_lora))
        with self._lora_lock:
            if labels != self._lora_labels:
                self._lora_labels, self._lora_since = labels, time.time()
            return labels, self._lora_since

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        v = self.view
        stats = v.engine()
        waiting, running, usage = stats.waiting, stats.running, stats.kv_usage
        yield GaugeMetricFamily("reft_queue_depth", "Requests waiting to be admitted.", value=waiting)
        yield GaugeMetricFamily("reft_running_batch_size", "Requests in the running batch.", value=running)
        yield GaugeMetricFamily("reft_resident_adapters", "Adapters on the device.", value=v.resident_adapters())
        yield GaugeMetricFamily("reft_registered_adapters", "Adapters in the registry.", value=v.registered_adapters())
        yield GaugeMetricFamily("reft_registry_rejected_files", "Files in the registry directory not served "
                                "(GET /v1/adapters/-/rejected lists them).", value=v.rejected_files())
        yield CounterMetricFamily("reft_registry_rejections", "Registry files rejected (a file again once changed).",
                                  value=v.rejections())
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (InferencePool queue).", value=waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests running (InferencePool).", value=running)
        yield GaugeMetricFamily("vllm:gpu_cache_usage_perc", "Fraction of the KV cache held by rows (0-1).",
                                value=usage)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the KV cache held by rows (0-1).", value=usage)
        yield CounterMetricFamily("reft_adapter_cache_hits", "Prefills whose adapter was resident.",
                                  value=v.adapter_cache_hits())
        yield CounterMetricFamily("reft_adapter_cache_misses", "Adapters loaded onto the device.",
                                  value=v.adapter_cache_misses())
        yield CounterMetricFamily("reft_decode_steps", "Batched decode steps run.", value=stats.steps)
        yield CounterMetricFamily("reft_prefill_batches", "Batched prefills run (a burst should take one).",
                                  value=stats.prefills)
        yield CounterMetricFamily("reft_prefill_positions", "Prompt positions computed in prefills.",
                                  value=stats.prefill_positions)
        yield CounterMetricFamily("reft_intervened_positions", "(row, layer-round, position) pairs intervened on.",
                                  value=stats.intervened_positions)
        yield CounterMetricFamily("reft_grammar_compiles", "Structured-output grammars compiled (cache misses).",
                                  value=v.grammar_compiles())
        yield CounterMetricFamily("reft_grammar_compile_seconds", "Time spent compiling those grammars.",
                                  value=v.grammar_compile_seconds())
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=stats.prefix_queried_tokens)
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (KV reused).",
                                  value=stats.prefix_hit_tokens)
        yield GaugeMetricFamily("reft_prefix_cache_blocks", "Blocks held by the prefix cache (evicted on demand).",
                                value=stats.prefix_blocks)
        config = GaugeMetricFamily(
            "vllm:cache_config_info", "KV cache configuration (the router's prefix scorer reads block_size).",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        config.add_metric([str(v.block_size), str(v.num_blocks), str(v.prefix_caching)], 1)
        yield config
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters running and waiting; value = time of the last change.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        labels, since = self._lora_info(stats)
        info.add_metric(list(labels), since)
        yield info
        yield from self._residency()

    def _residency(self) -> Iterable[GaugeMetricFamily]:
        gpu = self.view.gpu_adapters()
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter(
            (self.label(name), "gpu", str(pinned).lower()) for name, pinned in gpu
        )
        counts.update((self.label(name), "cpu", "false") for name in self.view.cpu_adapters())
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded", "Adapter versions resident, by level: gpu = device cache, cpu = host cache.",
            labels=["adapter_name", "level", "pinned"],
        )
        for key, count in sorted(counts.items()):
            loaded.add_metric(list(key), count)
        yield loaded
        yield GaugeMetricFamily("vllm:num_gpu_loaded_lora_adapters", "Adapter versions in the device cache.",
                                value=len(gpu))
        yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "Adapters one batch can mix (max_lora; the device "
                                "cache is bounded in bytes, REFT_ADAPTER_CACHE_BYTES, and evicts to make room).",
                                value=self.view.max_lora)


class Metrics:
    def __init__(self, max_adapter_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.view = EngineView()
        self.registry.register(_EngineCollector(self.view, max_adapter_labels, self.adapter_label))
        self._labels: set[str] = set()
        self._max_labels = max_adapter_labels
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "reft_requests", "Requests finished, by endpoint and status.", ["endpoint", "adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter("reft_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter("reft_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.latency = Histogram(
            "reft_request_latency_seconds", "Request latency, arrival to last token.", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.scan_failures = Counter(
            "reft_registry_scan_failures", "Registry scans that failed as a whole (the next one still runs).",
            registry=r,
        )
        self.ttft = Histogram(
            "reft_time_to_first_token_seconds", "Arrival to first token.", ["adapter"], buckets=TTFT_BUCKETS, registry=r
        )
        self.adapter_loads = Counter(
            "reft_adapter_loads", "Adapter reads from the registry (host cache misses); concurrent requests share one.",
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "vllm:lora_adapter_load_seconds", "Time to load an adapter into the device cache (a cache miss: its "
            "forms computed and copied to the device), since the server became ready.",
            buckets=ADAPTER_LOAD_BUCKETS, registry=r,
        )

    def adapter_label(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._labels:
                return adapter
            if len(self._labels) < self._max_labels:
                self._labels.add(adapter)
                return adapter
        return OTHER_LABEL
