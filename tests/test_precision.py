"""bfloat16 on the CPU (`--dtype bfloat16`): the engine generates with the emoji adapter and random LoReFT
adapters, interventions are computed in float32 on the bf16 hidden state, and the greedy tokens mostly
agree with float32's. What must hold, not speed (bench/device.py measures that and the full agreement).

One float32 and one bfloat16 engine (model, runner, scheduler) for the module, each run alone in turn.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from server.adapter_file import Adapter, build, import_pyreft, make_intervention
from server.engine import runner as runner_module
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.output import Event
from server.engine.plan import BatchPlan
from server.engine.runner import ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler
from server.interventions import reference_apply
from server.model import BaseModel, load_base_model
from server.positions import Positions

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((DATA / "expected.json").read_text())["emoji"]
GENERATIONS = EXPECTED["generations"]
PROMPTS = [g["prompt_ids"] for g in GENERATIONS]
EOS = 2
RANDOM_NEW_TOKENS = 12
WAIT_S = 300
BF16_ULP = 2.0**-7  # bfloat16 keeps 8 significant bits: one step is at most 2^-7 of the value


@dataclass
class Side:
    """One engine in one dtype."""

    base: BaseModel
    runner: ModelRunner
    cache: DeviceAdapterCache
    sch: EngineLoop


class Result:
    """A request's events, gathered from the engine thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def logprobs(self) -> list[float]:
        return [lp.logprob for e in self.events for lp in e.logprobs]

    @property
    def prompt_logprobs(self) -> list[float]:
        return [lp.logprob for e in self.events for lp in (e.prompt_logprobs or ())]


def random_loreft(base: BaseModel, seed: int) -> Adapter:
    """Rank-4 LoReFT on layers 3 and 9 at f2+l2, strong enough to change greedy outputs (as the bench's)."""
    d = base.shape.hidden_size
    gen = torch.Generator().manual_seed(seed)
    ivs = []
    for i, layer in enumerate((3, 9)):
        q, _ = torch.linalg.qr(torch.randn(d, 4, generator=gen, dtype=torch.float64))
        tensors = {"rotate_layer": q.float().contiguous(), "weight": torch.randn(4, d, generator=gen) * (3 / d**0.5),
                   "bias": torch.randn(4, generator=gen) * 3}
        ivs.append(make_intervention(i, "loreft", layer, 4, tensors, base.shape, 64, "float32"))
    return build(ivs, Positions.parse("f2+l2"), True, base.shape, "float32")


def start(dtype: str) -> Side:
    base = load_base_model(None, "cpu", dtype)
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 27))
    cache = DeviceAdapterCache(base.device, torch.float32, 1 << 26, set())  # as build_engine: forms in float32
    policy = Scheduler(runner.cache, cache.get, max_batch_size=32, max_queue=64, max_prefill_tokens=4096,
                       max_prompt_tokens=1024, max_context=2048)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
                     eos_token_ids=[EOS])
    sch.start()
    return Side(base, runner, cache, sch)


def run_all(side: Side, jobs: list[tuple[list[int], AdapterRef | None, SamplingParams]]) -> list[Result]:
    """Submit every job at once (they share batches, as under load) and wait for all."""
    results = []
    for prompt, adapter, params in jobs:
        result = Result()
        side.sch.submit(GenerationRequest(list(prompt), params, adapter, result))
        results.append(result)
    for result in results:
        assert result.done.wait(WAIT_S), "request did not finish"
        assert result.events[-1].finish_reason in ("stop", "length"), result.events[-1]
    return results


@dataclass
class Runs:
    """Each workload's results in float32 and bfloat16."""

    sides: dict[str, Side]
    emoji: AdapterRef
    randoms: list[AdapterRef]
    results: dict[str, dict[str, list[Result]]]  # workload -> dtype -> results
    scores: dict[str, dict[str, list[Result]]]  # workload -> dtype -> echoed prompt + float32 completion


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    sides: dict[str, Side] = {}
    try:
        for dtype in ("float32", "bfloat16"):
            sides[dtype] = start(dtype)
        shape = sides["float32"].base.shape
        emoji = AdapterRef("emoji", 1, import_pyreft(DATA, EXPECTED["positions"], EXPECTED["share_weights"], shape, 64))
        randoms = [AdapterRef(f"r{s}", 1, random_loreft(sides["float32"].base, s)) for s in range(3)]
        workloads = {
            "emoji": [(p, emoji, SamplingParams(max_new_tokens=32, logprobs=0)) for p in PROMPTS],
            "random": [(p, r, SamplingParams(max_new_tokens=RANDOM_NEW_TOKENS, ignore_eos=True, logprobs=0))
                       for r in randoms for p in PROMPTS],
        }
        results: dict[str, dict[str, list[Result]]] = {w: {} for w in workloads}
        scores: dict[str, dict[str, list[Result]]] = {w: {} for w in workloads}
        for dtype, side in sides.items():  # one engine computes at a time
            for workload, jobs in workloads.items():
                results[workload][dtype] = run_all(side, jobs)
        for workload, jobs in workloads.items():
            # Echo the prompt + float32's completion (max_new_tokens 0): both dtypes score the same tokens.
            scored = [(p + r.tokens, a, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
                      for (p, a, _), r in zip(jobs, results[workload]["float32"], strict=True)]
            for dtype, side in sides.items():
                scores[workload][dtype] = run_all(side, scored)
        yield Runs(sides, emoji, randoms, results, scores)
    finally:
        for side in sides.values():
            side.sch.stop()


def agreement(runs: Runs, workload: str) -> dict[str, float]:
    """bf16 against fp32 greedy: identical completions, first tokens, tokens at the same index, Δ logprob."""
    fp32, bf16 = runs.results[workload]["float32"], runs.results[workload]["bfloat16"]
    same = [a.tokens == b.tokens for a, b in zip(fp32, bf16, strict=True)]
    first = [a.tokens[:1] == b.tokens[:1] for a, b in zip(fp32, bf16, strict=True)]
    tokens = sum(x == y for a, b in zip(fp32, bf16, strict=True) for x, y in zip(a.tokens, b.tokens, strict=False))
    deltas = []
    for a, b, r in zip(runs.scores[workload]["float32"], runs.scores[workload]["bfloat16"], fp32, strict=True):
        n = len(r.tokens)  # the completion's logprobs are the echoed sequence's last n
        deltas += [abs(x - y) for x, y in zip(a.prompt_logprobs[-n:], b.prompt_logprobs[-n:], strict=True)]
    return {"identical": sum(same) / len(same), "first_token": sum(first) / len(first),
            "tokens": tokens / sum(len(r.tokens) for r in fp32), "dlogprob_mean": sum(deltas) / len(deltas),
            "dlogprob_max": max(deltas)}


@pytest.mark.parametrize("workload", ["emoji", "random"])
def test_bf16_generation_runs_and_mostly_agrees_with_fp32(runs, workload):
    vocab = runs.sides["bfloat16"].base.model.config.vocab_size
    for results in runs.results[workload].values():
        for r in results:
            assert r.tokens and all(0 <= t < vocab for t in r.tokens)
            assert len(r.logprobs) == len(r.tokens) and all(math.isfinite(x) and x <= 0 for x in r.logprobs)
    for dtype, scored in runs.scores[workload].items():
        for s in scored:
            assert s.prompt_logprobs and all(math.isfinite(x) for x in s.prompt_logprobs), dtype
    if workload == "emoji":  # our float32 engine is pyreft's greedy output, token for token
        assert [r.tokens for r in runs.results["emoji"]["float32"]] == [g["completion_ids"] for g in GENERATIONS]
    a = agreement(runs, workload)
    print(f"\nbf16 vs fp32 greedy ({workload}): {a['identical']:.0%} identical completions, first token "
          f"{a['first_token']:.0%}, tokens at the same index {a['tokens']:.0%}; |Δ logprob| of fp32's tokens "
          f"mean {a['dlogprob_mean']:.3f}, max {a['dlogprob_max']:.3f}")
    assert a["first_token"] > 0.5, a
    # bf16 rounds each weight and activation to 8 significant bits; a mean shift of a nat would be a bug.
    assert a["dlogprob_mean"] < 0.5 and a["dlogprob_max"] < 5.0, a


def test_bf16_interventions_computed_in_float32(runs, monkeypatch):
    """The intervened positions hold the adapter applied in float32 to the bf16 hidden state, cast back to
    bf16 (to within one bf16 rounding step); the others are untouched; and a bf16 computation would differ."""
    side = runs.sides["bfloat16"]
    adapter = runs.emoji.adapter
    layer = adapter.interventions[0].layer
    prompt = PROMPTS[0]
    captured: dict[str, torch.Tensor] = {}
    apply = runner_module.intervene

    def capture(plan: BatchPlan, layer_index: int, hidden: torch.Tensor) -> None:
        """The layer's output [N, hidden] as the runner's forward hands it over, and after the plan's changes."""
        if layer_index == layer:
            captured["before"] = hidden.reshape(-1, hidden.shape[-1]).clone()
        apply(plan, layer_index, hidden)
        if layer_index == layer:
            captured["after"] = hidden.reshape(-1, hidden.shape[-1]).clone()

    monkeypatch.setattr(runner_module, "intervene", capture)
    resident = side.cache.get(runs.emoji)
    assert all(t.dtype == torch.float32 for f in resident.forms for t in (f.W, f.b, f.P, f.p, f.A))
    slot = side.runner.cache.allocate(len(prompt))
    try:
        side.runner.prefill([PrefillChunk(prompt, 0, len(prompt), slot, resident)])
    finally:
        side.runner.cache.free(slot)
    before, after = captured["before"], captured["after"]
    assert before.dtype == after.dtype == torch.bfloat16
    expected, in_bf16 = before.clone(), before.clone()
    touched = set()
    for iv, positions in zip(adapter.interventions, adapter.locations(len(prompt)), strict=True):
        if iv.layer != layer:
            continue
        idx = torch.tensor(positions)
        touched.update(positions)
        expected[idx] = reference_apply(iv, expected[idx].float()).to(torch.bfloat16)
        iv_bf16 = type(iv)(iv.type, iv.layer, iv.rank, {k: v.bfloat16() for k, v in iv.tensors.items()})
        in_bf16[idx] = reference_apply(iv_bf16, in_bf16[idx])
    assert touched
    others = [i for i in range(len(prompt)) if i not in touched]
    assert torch.equal(after[others], before[others])
    rows = sorted(touched)
    assert not torch.equal(after[rows], before[rows])
    torch.testing.assert_close(after[rows].float(), expected[rows].float(), rtol=BF16_ULP, atol=1e-6)
    exact_fp32 = (after[rows] == expected[rows]).float().mean().item()
    exact_bf16 = (after[rows] == in_bf16[rows]).float().mean().item()
    print(f"\nintervened values equal to the float32 computation: {exact_fp32:.2%}; to a bf16 one: {exact_bf16:.2%}")
    assert exact_fp32 > 0.99 and exact_bf16 < exact_fp32
