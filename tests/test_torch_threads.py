"""Torch work off the engine thread must not leave an OpenMP pool behind (see server/torch_threads.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from server.torch_threads import in_own_thread, run_in_own_thread


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> str:
    x = torch.randn(768, 768)
    (x @ x).sum().item()
    return threading.current_thread().name


def settled_thread_count(expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return os_threads()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="needs /proc and a multi-threaded torch")
def test_torch_work_in_its_own_thread_leaves_no_pool_behind():
    parallel_work()  # this thread's own pool exists from here on
    baseline = os_threads()
    assert run_in_own_thread(parallel_work) != threading.current_thread().name
    assert settled_thread_count(baseline) == baseline

    async def call() -> str:
        return await in_own_thread(parallel_work)

    assert asyncio.run(call()) != threading.current_thread().name
    assert settled_thread_count(baseline) == baseline

    # what the helpers prevent: a thread that ran torch and lives on keeps its pool's threads
    done = threading.Event()

    def lingering() -> None:
        parallel_work()
        done.wait()

    thread = threading.Thread(target=lingering)
    thread.start()
    try:
        time.sleep(0.5)
        assert os_threads() > baseline + 1
    finally:
        done.set()
        thread.join()


def test_errors_come_back_to_the_caller():
    def fail() -> None:
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        run_in_own_thread(fail)
    with pytest.raises(ValueError, match="bad adapter"):
        asyncio.run(in_own_thread(fail))
