"""Torch work outside the engine thread runs in threads that exit when it is done.

Every thread that runs a parallel torch op gets its own OpenMP (libgomp) thread pool, and keeps
it until the thread exits. Once a process has more OpenMP threads than cores, libgomp stops
spinning between parallel regions, and every op of the engine's forward pass pays for waking
its workers. Measured on a 2-core CPU: one idle pool left by a thread that had parsed an adapter
cut batched `generate` from about 125 to 110 tok/s, and one left by a 512x512 matmul to about 92.
So the engine thread is the only long-lived thread that runs torch; model loading, adapter
parsing and directory scans each run in a thread of their own that exits afterwards.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def _one_shot() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reft-torch-job")


def run_in_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` in a new thread and wait for it; the thread (and its OpenMP pool) ends with the call."""
    with _one_shot() as executor:
        return executor.submit(fn, *args, **kwargs).result()


async def in_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await `fn` run in a new thread, which exits once `fn` returns."""
    executor = _one_shot()
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    finally:
        executor.shutdown(wait=False)
