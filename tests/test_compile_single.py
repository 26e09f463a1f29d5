"""The lone-row decode step under torch.compile (`compiled.CompiledLoneRow`, on by default on a CPU).

Its graph skips dynamo's guards, so nothing would catch a graph that baked in one slot or one length:
these tests decode at many slots and lengths against the eager lean step, check pyreft's greedy tokens
through it, and check the fallbacks when it cannot compile or computes something else.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from server.adapter_file import import_pyreft
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.compiled import CompiledLoneRow
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler
from server.model import BaseModel, load_base_model

DATA = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((DATA / "expected.json").read_text())["emoji"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def lone():
    base = load_base_model()
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 28),
                         compile_single=True, pack_weights=True, attention_kernel=True)  # the server's defaults
    graphs = counters["stats"].get("unique_graphs", 0)
    runner.warm_up()
    assert runner.lone_row is not None, "the lone-row step did not compile (see the warning in the log)"
    assert counters["stats"].get("unique_graphs", 0) == graphs + 1, "one graph for every slot and length"
    return base, runner


def eager(runner: ModelRunner, rows: list[DecodeRow]) -> torch.Tensor:
    kept, runner.lone_row = runner.lone_row, None
    try:
        return runner.decode(rows)
    finally:
        runner.lone_row = kept


def lone_row_agrees_with_the_eager_step(runner: ModelRunner) -> None:
    """The runner's lone-row step against the eager one at two slots of one block and a run of whole blocks, at
    lengths from 2 to 3,000."""
    cache = runner.cache
    slots = [cache.allocate(n) for n in (40, 40, 3000)]
    assert len({s.start for s in slots}) == 3 and slots[2].blocks > 1
    try:
        for slot in slots:
            prompt = list(range(100, 120 if slot.size < 100 else 300))
            runner.prefill([PrefillChunk(prompt, 0, len(prompt), slot)])
            for position in (1, 2, 19, 20, 39) if slot.size < 100 else (199, 200, 1000, 2047, 2999):
                row = [DecodeRow(7 + position % 50, position, slot)]
                got = runner.decode(row)
                reference = eager(runner, row)
                assert (got - reference).abs().max().item() < 1e-3, (slot, position)
                assert torch.equal(got.argmax(-1), reference.argmax(-1))
    finally:
        for slot in slots:
            cache.free(slot)


def test_compiled_and_eager_agree_at_every_slot_and_length(lone):
    _, runner = lone
    graphs = counters["stats"].get("unique_graphs", 0)
    lone_row_agrees_with_the_eager_step(runner)
    assert counters["stats"].get("unique_graphs", 0) == graphs, "recompiled"


def second_runner_agrees_with_its_eager_step(first: ModelRunner, **options: bool) -> ModelRunner:
    """Another runner in the process (`options` as ModelRunner's), over pools of another size and a model of its own
    (a runner hooks its model's layers, as in the server): its lone-row step against its eager one. Returns it."""
    base = load_base_model()
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 27),
                         pack_weights=True, attention_kernel=True, **options)
    runner.warm_up()
    assert runner.lone_row is not None and runner.cache.k[0].shape != first.cache.k[0].shape
    slot = runner.cache.allocate(40)
    try:
        runner.prefill([PrefillChunk(list(range(100, 120)), 0, 20, slot)])
        row = [DecodeRow(7, 20, slot)]
        assert (runner.decode(row) - eager(runner, row)).abs().max().item() < 1e-3
    finally:
        runner.cache.free(slot)
    return runner


def test_a_second_runner_in_the_process_compiles_its_own_step(lone):
    """Guards are skipped: another runner, with pools of another size, must not run the first one's graph."""
    second_runner_agrees_with_its_eager_step(lone[1], compile_single=True)


def pyreft_tokens_one_request_at_a_time(base: BaseModel, runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyreft's emoji generations through the engine loop, one request at a time (every decode step has one row): its
    exact greedy tokens, each decode step but the first of each request through the runner's lone-row step."""
    emoji = AdapterRef("emoji", 1, import_pyreft(DATA, EXPECTED["positions"], EXPECTED["share_weights"],
                                                 base.shape, 64))
    adapters = DeviceAdapterCache(base.device, base.dtype, 1 << 26, set())
    policy = Scheduler(runner.cache, adapters.get, max_batch_size=1, max_queue=64, max_prefill_tokens=4096,
                       max_prompt_tokens=4096, max_context=8192)
    calls = 0
    kind = type(runner.lone_row)
    step = kind.__call__

    def counted(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return step(*args)

    monkeypatch.setattr(kind, "__call__", counted)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids), eos_token_ids=[2])
    sch.start()
    try:
        for g in EXPECTED["generations"]:
            tokens: list[int] = []
            done = threading.Event()

            def on_event(event, tokens=tokens, done=done) -> None:  # noqa: ANN001 - the loop's event type
                tokens.extend(event.token_ids)
                if event.finish_reason is not None:
                    done.set()

            sch.submit(GenerationRequest(g["prompt_ids"], SamplingParams(max_new_tokens=len(g["completion_ids"])),
                                         emoji, on_event))
            assert done.wait(600)
            assert tokens == g["completion_ids"], g["question"]
    finally:
        sch.stop()
    assert isinstance(runner.lone_row, kind)
    assert calls >= sum(len(g["completion_ids"]) - 1 for g in EXPECTED["generations"]), "decoded elsewhere"


def test_pyreft_greedy_tokens_through_the_compiled_lone_row(lone, monkeypatch):
    base, runner = lone
    pyreft_tokens_one_request_at_a_time(base, runner, monkeypatch)


def test_a_step_that_cannot_compile_leaves_the_eager_step(lone, caplog):
    """No C++ compiler, say: warm-up reports it, frees its slots, and the runner decodes eagerly."""
    _, runner = lone
    cache = runner.cache
    failing = CompiledLoneRow(runner.lean, cache)

    def no_compiler(*args: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    failing._step = no_compiler
    used = cache.used_tokens
    assert failing.warm_up() is False
    assert cache.used_tokens == used
    assert "could not compile the lone-row decode step" in caplog.text


def test_a_compiled_step_that_computes_something_else_is_not_used(lone, caplog):
    """The warm-up check: a graph that read the wrong columns (here: logits of another row) is refused."""
    _, runner = lone
    wrong = CompiledLoneRow(runner.lean, runner.cache)
    right = runner.lone_row._step
    wrong._step = lambda ids, positions, columns, start, kv_len: right(ids + 1, positions, columns, start, kv_len)
    assert wrong.warm_up() is False
    assert "differs from the eager one" in caplog.text


def test_without_a_cpp_compiler_the_step_stays_eager_before_any_tracing(lone, caplog, monkeypatch):
    """The probe runs first: a server without a compiler (the Docker image) does not spend the trace's time."""
    from server.engine import compiled as compiled_module

    _, runner = lone
    step = CompiledLoneRow(runner.lean, runner.cache)

    def must_not_trace(*args: object) -> torch.Tensor:
        raise AssertionError("traced without a C++ compiler")

    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found")

    step._step = must_not_trace
    monkeypatch.setattr(compiled_module, "get_cpp_compiler", no_compiler)
    assert step.warm_up() is False
    assert "no C++ compiler for torch.compile" in caplog.text
