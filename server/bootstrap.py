"""The composition root: load the base model and the registry, start the scheduler, and hand
the assembled `Engine` to the API. Only the app factory and the CLI import this module."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.engine.adapter_cache import DeviceAdapterCache
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.host_memory import keep_freed_memory
from server.model import BaseModel, load_base_model
from server.registry import Registry


@dataclass
class Engine:
    """Everything loaded at start-up that serving needs."""

    base: BaseModel
    registry: Registry
    scheduler: Scheduler
    adapter_cache: DeviceAdapterCache
    max_new_tokens: int
    load_seconds: float = 0.0


def build_engine(settings: Settings) -> Engine:
    """Load the base model and the registry, and start the scheduler: everything behind the API."""
    start = time.perf_counter()
    base = load_base_model(settings.model, settings.device, settings.dtype)
    if base.device.type == "cpu":
        keep_freed_memory()
    registry = Registry(
        Path(settings.adapters), base.shape, max_rank=settings.max_rank, max_adapter_bytes=settings.max_adapter_bytes,
        host_cache_bytes=settings.host_adapter_cache_bytes,
    )
    registry.open()
    cache = DeviceAdapterCache(base.device, base.dtype, settings.adapter_cache_bytes, set(settings.pinned_adapters))
    registry.on_removed.append(cache.drop)
    for name in settings.pinned_adapters:
        cache.get(registry.resolve(name))
    eos = base.model.generation_config.eos_token_id
    if eos is None:
        eos = base.tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    max_prompt = min(settings.max_prompt_tokens or base.max_context, base.max_context - 1)
    scheduler = Scheduler(
        ModelRunner(base),
        lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
        cache,
        eos_token_ids=eos_ids,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_prompt_tokens=max_prompt,
        max_context=base.max_context,
        batch_wait=settings.batch_wait_ms / 1000,
        batch_quiet=settings.batch_quiet_ms / 1000,
    )
    scheduler.start()
    # Everything loaded so far lives as long as the server. Freezing it keeps the collector from
    # walking it again: a full collection over it paused the event loop for about 190 ms.
    gc.collect()
    gc.freeze()
    return Engine(base, registry, scheduler, cache, settings.max_new_tokens, time.perf_counter() - start)
