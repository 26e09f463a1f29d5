"""Prometheus metrics: our own `reft_*` families, and the vLLM-named gauges that the Kubernetes
Gateway API Inference Extension's endpoint picker reads (queue, running, cache use, adapters),
so replicas can sit in an InferencePool with adapter affinity and no custom code.

Adapter labels are bounded: the first `max_adapter_labels` adapters seen keep their name, any
later one is counted as "other", so a registry of 10,000 adapters cannot blow up cardinality.
`vllm:lora_requests_info` lists at most that many running and as many waiting adapter names (the
endpoint picker needs names there, in vLLM's comma-separated form); deployments that want the
names private set REFT_METRICS_KEY.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
BASE_LABEL = "base"
OTHER_LABEL = "other"
UNKNOWN_LABEL = "unknown"  # refused before the request named its adapter


class EngineView:
    """What the engine-state gauges read at scrape time (filled in once the model is loaded)."""

    num_waiting: Callable[[], int] = staticmethod(lambda: 0)
    num_running: Callable[[], int] = staticmethod(lambda: 0)
    max_batch_size: int = 1
    running_adapters: Callable[[], list[str]] = staticmethod(lambda: [])
    waiting_adapters: Callable[[], list[str]] = staticmethod(lambda: [])
    resident_adapters: Callable[[], int] = staticmethod(lambda: 0)
    registered_adapters: Callable[[], int] = staticmethod(lambda: 0)
    rejected_files: Callable[[], int] = staticmethod(lambda: 0)
    rejections: Callable[[], int] = staticmethod(lambda: 0)
    max_lora: int = 0
    adapter_cache_hits: Callable[[], int] = staticmethod(lambda: 0)
    adapter_cache_misses: Callable[[], int] = staticmethod(lambda: 0)
    decode_steps: Callable[[], int] = staticmethod(lambda: 0)
    prefill_batches: Callable[[], int] = staticmethod(lambda: 0)
    intervened_positions: Callable[[], int] = staticmethod(lambda: 0)
    prefill_positions: Callable[[], int] = staticmethod(lambda: 0)
    kv_cache_usage: Callable[[], float] = staticmethod(lambda: 0.0)
    grammar_compiles: Callable[[], int] = staticmethod(lambda: 0)
    grammar_compile_seconds: Callable[[], float] = staticmethod(lambda: 0.0)
    prefix_queries: Callable[[], int] = staticmethod(lambda: 0)
    prefix_hits: Callable[[], int] = staticmethod(lambda: 0)
    prefix_cached_blocks: Callable[[], int] = staticmethod(lambda: 0)
    prefix_caching: bool = False
    block_size: int = 0  # tokens per block: the prefix cache's, or the KV cache's when the prefix cache is off
    num_blocks: int = 0  # blocks of that size the KV cache holds


class _EngineCollector(Collector):
    def __init__(self, view: EngineView, max_listed: int) -> None:
        self.view = view
        self.max_listed = max_listed
        self._lora_lock = threading.Lock()
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_since = 0.0

    def _lora_info(self) -> tuple[tuple[str, str, str], float]:
        """The adapters running and waiting, and when that last changed (not when it was scraped).

        The router keeps the series with the highest value, as vLLM stamps each new combination
        with its creation time. A change is stamped when a scrape first sees it, so at most one
        scrape interval late."""
        v = self.view
        labels = (",".join(v.running_adapters()[: self.max_listed]), ",".join(v.waiting_adapters()[: self.max_listed]),
                  str(v.max_lora))
        with self._lora_lock:
            if labels != self._lora_labels:
                self._lora_labels, self._lora_since = labels, time.time()
            return labels, self._lora_since

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        v = self.view
        waiting, running = v.num_waiting(), v.num_running()
        usage = v.kv_cache_usage()
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
        yield CounterMetricFamily("reft_decode_steps", "Batched decode steps run.", value=v.decode_steps())
        yield CounterMetricFamily("reft_prefill_batches", "Batched prefills run (a burst should take one).",
                                  value=v.prefill_batches())
        yield CounterMetricFamily("reft_prefill_positions", "Token positions computed in prefills (padding included).",
                                  value=v.prefill_positions())
        yield CounterMetricFamily("reft_intervened_positions", "(row, layer-round, position) pairs intervened on.",
                                  value=v.intervened_positions())
        yield CounterMetricFamily("reft_grammar_compiles", "Structured-output grammars compiled (cache misses).",
                                  value=v.grammar_compiles())
        yield CounterMetricFamily("reft_grammar_compile_seconds", "Time spent compiling those grammars.",
                                  value=v.grammar_compile_seconds())
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=v.prefix_queries())
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (KV reused).",
                                  value=v.prefix_hits())
        yield GaugeMetricFamily("reft_prefix_cache_blocks", "Blocks held by the prefix cache (evicted on demand).",
                                value=v.prefix_cached_blocks())
        config = GaugeMetricFamily(
            "vllm:cache_config_info", "KV cache configuration (the router's prefix scorer reads block_size).",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        config.add_metric([str(v.block_size), str(v.num_blocks), str(v.prefix_caching)], 1)
        yield config
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters running and waiting; value = time of the last change.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        labels, since = self._lora_info()
        info.add_metric(list(labels), since)
        yield info


class Metrics:
    def __init__(self, max_adapter_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.view = EngineView()
        self.registry.register(_EngineCollector(self.view, max_adapter_labels))
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
