"""The composition root: load the base model and the registry, start the engine loop, and hand
the assembled `Engine` to the API. Only the app factory and the CLI import this module."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server import tokens
from server.config import Settings
from server.engine.adapter_cache import DeviceAdapterCache
from server.engine.kv_cache import KVCache, default_budget
from server.engine.loop import EngineLoop
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.engine.structured import GrammarCompiler
from server.host_memory import keep_freed_memory
from server.model import BaseModel, load_base_model
from server.registry import Registry
from server.training_jobs import JobLimits, TrainingJobs

log = logging.getLogger(__name__)

# How long an idle engine waits for a burst to stop arriving, by device, unless REFT_BATCH_QUIET_MS
# says otherwise. On CPU a prefill of a burst costs seconds and arrivals spread over 25-40 ms, so
# 30 ms of quiet lets the burst share one prefill; on a GPU a prefill takes milliseconds, and a lone
# request should not wait 30 ms for its first token.
BATCH_QUIET_MS = {"cpu": 30.0, "cuda": 2.0}
# Training time per engine iteration while serving, by device, unless REFT_TRAIN_BUDGET_MS says
# otherwise: a stream's token gap grows by about this much while a job trains, so it is set below
# one decode step of the default model (about 55 ms on a 2-core CPU, bench/RESULTS.md).
TRAIN_BUDGET_MS = {"cpu": 40.0, "cuda": 10.0}


@dataclass
class Engine:
    """Everything loaded at start-up that serving needs."""

    base: BaseModel
    registry: Registry
    loop: EngineLoop
    adapter_cache: DeviceAdapterCache
    training: TrainingJobs
    max_new_tokens: int
    grammars: GrammarCompiler  # structured outputs: compiles off the engine thread, cached
    load_seconds: float = 0.0


def build_engine(settings: Settings) -> Engine:
    """Load the base model and the registry, and start the engine loop: everything behind the API."""
    start = time.perf_counter()
    base = load_base_model(settings.model, settings.device, settings.dtype)
    if base.device.type == "cpu":
        keep_freed_memory()
    registry = Registry(
        Path(settings.adapters), base.shape, max_rank=settings.max_rank, max_adapter_bytes=settings.max_adapter_bytes,
        read_only=settings.read_only_registry, host_cache_bytes=settings.host_adapter_cache_bytes,
        max_interventions=settings.max_interventions, serving_dtype=base.dtype,
    )
    registry.open()
    cache = DeviceAdapterCache(base.device, torch.float32, settings.adapter_cache_bytes, set(settings.pinned_adapters))
    registry.on_removed.append(cache.drop)
    for name in settings.pinned_adapters:
        cache.get(registry.resolve(name))
    eos_ids = tokens.stop_ids(base.tokenizer, base.model.generation_config)
    max_prompt = min(settings.max_prompt_tokens or base.max_context, base.max_context - 1)
    kv = KVCache.for_model(base.model.config, base.dtype, base.device,
                           settings.kv_cache_bytes or default_budget(base.device))
    log.info("KV cache: %d tokens in %d blocks of %d (%.2f GiB, %d bytes per token)", kv.capacity, kv.num_blocks,
             kv.block_tokens, kv.nbytes / 2**30, kv.bytes_per_token)
    runner = ModelRunner(base, kv, compile_decode=settings.compile, compile_single=settings.compile_single,
                         native_single=settings.native_single, pack_weights=settings.packed_weights,
                         panel_products=settings.panel_products,
                         attention_kernel=settings.attention_kernel, max_rows=settings.max_batch_size)
    if runner.lean is not None and runner.lean.packed_bytes:
        kind = "panel products" if runner.lean.head.panels is not None else "oneDNN"
        log.info("Packed weight copies for many-row decode steps (%s): %.0f MiB", kind,
                 runner.lean.packed_bytes / 2**20)
    policy = Scheduler(
        kv, cache.get,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_prompt_tokens=max_prompt,
        max_context=base.max_context,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        batch_wait=settings.batch_wait_ms / 1000,
        batch_quiet=(settings.batch_quiet_ms if settings.batch_quiet_ms is not None
                     else BATCH_QUIET_MS.get(base.device.type, 30.0)) / 1000,
        prefix=PrefixCache(min(settings.prefix_block_tokens, kv.block_tokens)) if settings.prefix_cache else None,
        prefix_keyed_by_adapter=settings.prefix_cache_scope == "adapter",
    )
    loop = EngineLoop(
        runner, policy, lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True), eos_token_ids=eos_ids,
        task_budget=(settings.train_budget_ms or TRAIN_BUDGET_MS.get(base.device.type, 40.0)) / 1000,
    )
    loop.start()
    # Everything loaded so far lives as long as the server. Freezing it keeps the collector from
    # walking it again: a full collection over it paused the event loop for about 190 ms.
    gc.collect()
    gc.freeze()
    grammars = GrammarCompiler(base.tokenizer, int(base.model.config.vocab_size), eos_ids,
                               max_entries=settings.grammar_cache_size, max_spec_bytes=settings.max_grammar_bytes,
                               timeout_s=settings.grammar_compile_seconds)
    limits = JobLimits(settings.max_train_jobs, settings.max_train_steps, settings.max_train_step_tokens)
    return Engine(base, registry, loop, cache, TrainingJobs(base, registry, loop, limits),
                  settings.max_new_tokens, grammars, time.perf_counter() - start)
