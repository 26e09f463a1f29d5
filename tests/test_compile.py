"""`--compile` on CPU: the decode step through torch.compile (inductor), captured once at start-up.

Rows join and leave while requests of different lengths, adapters and output lengths run: dynamo
must neither break the graph nor compile again, and the tokens must be pyreft's exact greedy
tokens, as on the eager path. Compiling takes a minute or two on two cores: one module, one runner.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._guards import TracingContext
from torch._inductor.utils import get_first_incompatible_cudagraph_node

from server.adapter_file import import_pyreft
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler
from server.model import load_base_model

DATA = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((DATA / "expected.json").read_text())["emoji"]
MAX_ROWS = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    counters.clear()
    base = load_base_model()
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 28),
                         compile_decode=True, max_rows=MAX_ROWS)
    runner.warm_up()  # the tests below decode in this thread too; a scheduler warms up again in its own
    emoji = AdapterRef("emoji", 1, import_pyreft(DATA, EXPECTED["positions"], EXPECTED["share_weights"],
                                                 base.shape, 64))
    return base, runner, emoji, dict(counters["stats"])


def graphs_compiled() -> int:
    return counters["stats"].get("unique_graphs", 0)


def run_all(base, runner, emoji, requests: list[tuple[list[int], int, bool]]) -> list[list[int]]:
    """Run greedy requests (prompt, max_tokens, with the emoji adapter) through a scheduler of MAX_ROWS rows:
    more requests than rows, so rows join and leave mid-run."""
    adapters = DeviceAdapterCache(base.device, base.dtype, 1 << 26, set())
    policy = Scheduler(runner.cache, adapters.get, max_batch_size=MAX_ROWS, max_queue=64, max_prefill_tokens=4096,
                       max_prompt_tokens=4096, max_context=8192, prefill_chunk_tokens=64)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids), eos_token_ids=[2])
    outputs: list[list[int]] = [[] for _ in requests]
    finished = [threading.Event() for _ in requests]

    def collect(i: int):
        def on_event(event) -> None:
            outputs[i].extend(event.token_ids)
            if event.finish_reason is not None:
                finished[i].set()
        return on_event

    sch.start()
    try:
        for i, (prompt, max_tokens, adapter) in enumerate(requests):
            sch.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=max_tokens), emoji if adapter else None,
                                         collect(i)))
        for event in finished:
            assert event.wait(600)
    finally:
        sch.stop()
    return outputs


def test_compiled_decode_matches_pyreft_and_never_recompiles(compiled):
    base, runner, emoji, after_warm_up = compiled
    assert after_warm_up.get("unique_graphs", 0) >= 1 and not counters["graph_break"]
    graphs = graphs_compiled()
    rng = random.Random(0)
    generations = EXPECTED["generations"]
    requests = [(g["prompt_ids"], len(g["completion_ids"]), True) for g in generations]
    requests += [([rng.randrange(3, 40000) for _ in range(rng.randrange(5, 300))], rng.randrange(1, 40), False)
                 for _ in range(6)]
    rng.shuffle(requests)
    got = run_all(base, runner, emoji, requests)
    for (prompt, _, adapter), tokens in zip(requests, got, strict=True):
        match = [g for g in generations if g["prompt_ids"] == prompt]
        if adapter:
            assert tokens == match[0]["completion_ids"][: len(tokens)] and tokens, "pyreft's tokens, compiled"
    assert graphs_compiled() == graphs, "recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_and_eager_decode_logits_agree_as_rows_join_and_leave(compiled):
    base, runner, _, _ = compiled
    graphs = graphs_compiled()
    cache = runner.cache
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in (7, 40, 130)]
    slots = [cache.allocate(len(p) + 8) for p in prompts]
    try:
        runner.prefill([PrefillChunk(p, 0, len(p), s) for p, s in zip(prompts, slots, strict=True)])
        kept = runner.compiled
        for live in ([0, 1, 2], [1, 2], [2], [0, 2]):  # rows leave, and one comes back
            rows = [DecodeRow(5 + i, len(prompts[i]), slots[i]) for i in live]
            with_compile = runner.decode(rows)
            runner.compiled = None
            try:
                eager = runner.decode(rows)
            finally:
                runner.compiled = kept
            assert (with_compile - eager).abs().max().item() < 1e-3
            assert torch.equal(with_compile.argmax(-1), eager.argmax(-1))
    finally:
        for slot in slots:
            cache.free(slot)
    assert graphs_compiled() == graphs


def test_the_intervention_hooks_add_nothing_to_the_compiled_step(compiled, monkeypatch):
    """A compiled decode step applies no intervention: with the hooks' intervention function made to fail,
    decode steps still run (the hooks saw no plan when traced, and replaying the graph runs no Python)."""
    from server.engine import runner as runner_module

    _, runner, _, _ = compiled
    graphs = graphs_compiled()

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("an intervention ran in a decode step")

    monkeypatch.setattr(runner_module, "batched_apply", must_not_run)
    slot = runner.cache.allocate(40)
    try:
        for position in (3, 4, 5):
            rows = [DecodeRow(7, position, slot), DecodeRow(9, position, runner.compiled.scratch)]
            assert runner.decode(rows).shape[0] == 2
    finally:
        runner.cache.free(slot)
    assert graphs_compiled() == graphs


def test_the_compiled_step_is_fit_for_cuda_graphs(compiled):
    """What a GPU needs of the step's graph, checked on the CPU on AOT's view of it (what inductor receives),
    traced again for the same step with a backend that records it:
    - every tensor it writes in place (the KV pools) is a static input, one address for every call; otherwise
      CUDA graph trees skip the graphs ("mutated inputs") and the step runs launch by launch;
    - no model constant became an input: a Python float made an input is a 0-dim CPU tensor, and a CPU tensor
      makes inductor split or skip the CUDA graph;
    - no op that inductor keeps out of CUDA graphs (data-dependent shapes, ops it marks unsafe to capture)."""
    _, runner, _, _ = compiled
    seen: list[tuple[set[int], set[int]]] = []
    scalars: list[int] = []
    unsafe: list[torch.fx.Node] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        meta = TracingContext.try_get().fw_metadata
        mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        seen.append((mutated, set(meta.static_input_indices)))
        scalars.extend(i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.dim() == 0)
        if (node := get_first_incompatible_cudagraph_node(gm)) is not None:
            unsafe.append(node)
        return gm

    step = runner.compiled
    kept = step._step
    backend = aot_autograd(fw_compiler=record, inference_compiler=record)
    step._step = torch.compile(runner._decode_forward, backend=backend, fullgraph=True, dynamic=True)
    try:
        step([(0, 0, step.scratch), (0, 1, step.scratch)])
    finally:
        step._step = kept
    (mutated, static), = seen
    assert len(mutated) == 2 * len(runner.cache.k), "the step writes each layer's key and value pool"
    assert mutated <= static, f"mutated inputs that are not static: {sorted(mutated - static)}"
    assert not scalars, f"{len(scalars)} 0-dim tensor inputs (Python floats made inputs)"
    assert not unsafe, f"an op CUDA graphs cannot hold: {unsafe[0].format_node()}"
