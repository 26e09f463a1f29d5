"""The engine end to end on the real default model: pyreft parity, batch invariance, sampling,
stop handling, cancellation and limits. One model and one running EngineLoop for the module.

Token counts are kept small so the file stays within a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import LOGPROB_ABS, wait_for

from bench import common
from server.adapter_file import Adapter, import_pyreft
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.output import Event, TextTracker
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import (
    EngineError,
    EngineStopped,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    Scheduler,
)
from server.model import BaseModel, load_base_model

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((DATA / "expected.json").read_text())["emoji"]
GENERATIONS = EXPECTED["generations"]
EOS = 2
MAX_PROMPT_TOKENS = 8000
MAX_CONTEXT = 8192
WAIT_S = 240
# A greedy mismatch between a batched and an alone run is accepted only where the alone run's
# two best logits are closer than this: a float near-tie, not a wrong computation.
NEAR_TIE = 1e-3


# ---- collecting events ----------------------------------------------------------------------


class Result:
    """The events of one request, collected from the engine thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.cond = threading.Condition()
        self.after_finish: list[Event] = []
        self.hook = None  # optional callable(Result, Event), run in the engine thread

    def __call__(self, event: Event) -> None:
        with self.cond:
            if self.done.is_set():
                self.after_finish.append(event)
                return
            self.events.append(event)
            if event.finish_reason is not None:
                self.done.set()
            self.cond.notify_all()
        if self.hook is not None:
            self.hook(self, event)

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    def wait(self, timeout: float = WAIT_S) -> Result:
        assert self.done.wait(timeout), f"request did not finish within {timeout} s: {self.events}"
        return self

    def wait_tokens(self, n: int, timeout: float = WAIT_S) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.tokens) >= n or self.done.is_set(), timeout)


@dataclass
class Engine:
    base: BaseModel
    runner: ModelRunner
    cache: DeviceAdapterCache
    sch: EngineLoop
    emoji: AdapterRef
    randoms: dict[str, AdapterRef]
    chat_prompts: list[list[int]]

    def decode(self, ids: list[int]) -> str:
        return self.base.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None = None,
               sch: EngineLoop | None = None) -> tuple[GenerationRequest, Result]:
        result = Result()
        request = GenerationRequest(list(prompt), params, adapter, result)
        (sch or self.sch).submit(request)
        return request, result

    def run(self, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None = None) -> Result:
        self.assert_idle()
        return self.submit(prompt, params, adapter)[1].wait()

    def greedy(self, prompt: list[int], max_new: int, adapter: AdapterRef | None = None, **kw) -> Result:
        return self.run(prompt, SamplingParams(max_new_tokens=max_new, **kw), adapter)

    def assert_idle(self) -> None:
        deadline = time.monotonic() + 10
        while (self.sch.num_running or self.sch.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.sch.num_running == 0 and self.sch.num_waiting == 0, "the scheduler should be idle here"

    def alone_gaps(self, prompt: list[int], adapter: AdapterRef | None, tokens: list[int]) -> list[float]:
        """Top-2 logit gap before each of `tokens`, running the prompt alone (scheduler idle)."""
        self.assert_idle()
        resident = self.cache.get(adapter) if adapter else None
        kv = self.runner.cache
        slot = kv.allocate(len(prompt) + len(tokens))
        try:
            logits = self.runner.prefill([PrefillChunk(prompt, 0, len(prompt), slot, resident)]).logits
            gaps = []
            for i, token in enumerate(tokens):
                top = logits[0].topk(2).values
                gaps.append(float(top[0] - top[1]))
                logits = self.runner.decode([DecodeRow(token, len(prompt) + i, slot)])
        finally:
            kv.free(slot)
        return gaps


# ---- random adapters on the real model --------------------------------------------------------


def random_adapter(base: BaseModel, specs: list[tuple[str, int, int]], positions: str, share: bool, seed: int,
                   strength: float) -> Adapter:
    """`bench.common.random_adapter` for the real model, W and b scaled alike by `strength`."""
    return common.random_adapter(base.shape, specs, positions, share, seed, weight_scale=strength,
                                 bias_scale=strength, proj_bias=True)


QUESTIONS = ["Tell me a joke about the sea.", "List three colors.", "Why is the sky blue?", "Hi!"]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    base = load_base_model()
    # Decode attention as the server runs it on a CPU (the kernel); the test servers add the packed copies
    # and the native lone row.
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 30),
                         attention_kernel=True)
    cache = DeviceAdapterCache(base.device, base.dtype, 1 << 28, set())
    policy = Scheduler(runner.cache, cache.get, max_batch_size=32, max_queue=64, max_prefill_tokens=8192,
                       max_prompt_tokens=MAX_PROMPT_TOKENS, max_context=MAX_CONTEXT)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
                     eos_token_ids=[EOS])
    emoji = AdapterRef("emoji", 1, import_pyreft(DATA, EXPECTED["positions"], EXPECTED["share_weights"],
                                                 base.shape, 64))
    randoms = {
        "lo": random_adapter(base, [("loreft", 3, 8), ("loreft", 9, 8)], "f3+l3", True, seed=1, strength=3.0),
        # unshared f+l: noreft/direft take the prefix, consreft/nodireft the suffix; two share layer 2
        "split": random_adapter(base, [("noreft", 2, 4), ("direft", 6, 4), ("consreft", 2, 4), ("nodireft", 12, 4)],
                                "f2+l3", False, seed=2, strength=3.0),
        "same-layer": random_adapter(base, [("lobireft", 5, 2), ("direft", 5, 6), ("loreft", 5, 3)], "l4", True,
                                     seed=3, strength=3.0),
    }
    randoms_refs = {name: AdapterRef(name, 1, ad) for name, ad in randoms.items()}
    chat = [
        base.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True)
        for q in QUESTIONS
    ]
    sch.start()
    yield Engine(base, runner, cache, sch, emoji, randoms_refs, [list(c) for c in chat])
    sch.stop()


# ---- the runner ----------------------------------------------------------------------------------


def test_prefill_runs_the_lm_head_as_one_matrix_product(engine):
    """The prefill's head reads its weight once, in whichever form start-up timed fastest for that many rows: one
    mm, one oneDNN product, or one bmm over the weight's row blocks (a view; lean_decode.split_linear), never a
    bmm over B expanded copies of it."""
    from torch.profiler import ProfilerActivity, profile

    engine.assert_idle()
    prompts = [p[:12] for p in engine.chat_prompts]
    vocab = engine.base.model.get_output_embeddings().weight.shape[0]
    kv = engine.runner.cache
    slots = [kv.allocate(len(p)) for p in prompts]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        chunks = [PrefillChunk(p, 0, len(p), s) for p, s in zip(prompts, slots, strict=True)]
        logits = engine.runner.prefill(chunks).logits
    for slot in slots:
        kv.free(slot)
    hidden, threads = engine.base.shape.hidden_size, torch.get_num_threads()
    head_products = [e for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "mkldnn::_linear_pointwise")
                     and any(vocab in shape or vocab // threads in shape for shape in e.input_shapes)]
    assert len(head_products) == 1, [(e.name, e.input_shapes) for e in head_products]
    read_once = ([vocab, hidden], [hidden, vocab], [threads, vocab // threads, hidden])
    assert any(shape in read_once for shape in head_products[0].input_shapes), head_products[0].input_shapes
    with torch.inference_mode():
        reference = engine.base.model(torch.tensor(prompts)).logits[:, -1]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


# ---- pyreft parity -----------------------------------------------------------------------------


def test_pyreft_parity_alone(engine):
    for g in GENERATIONS:
        r = engine.greedy(g["prompt_ids"], 32, engine.emoji)
        assert r.tokens == g["completion_ids"], g["question"]
        assert r.text == g["completion"], g["question"]
        assert r.finish == ("stop" if g["completion_ids"][-1] == EOS else "length")
        assert "\ufffd" not in r.text
        assert r.events[-1].prompt_tokens == len(g["prompt_ids"])
        assert r.events[-1].completion_tokens == len(g["completion_ids"])


def test_pyreft_parity_in_one_batch_with_base_rows(engine):
    engine.assert_idle()
    rows = []
    for i, g in enumerate(GENERATIONS):
        # interleave base rows (including a short one) with the adapter rows
        rows.append((g, engine.submit(g["prompt_ids"], SamplingParams(max_new_tokens=32), engine.emoji)[1]))
        if i % 2 == 0:
            rows.append((None, engine.submit(g["prompt_ids"], SamplingParams(max_new_tokens=12))[1]))
    for g, r in rows:
        r.wait()
        if g is not None:
            assert r.tokens == g["completion_ids"], g["question"]
            assert r.text == g["completion"], g["question"]
    # the base rows give pyreft's base-model continuation, untouched by their neighbours' adapter
    base_rows = [r for g, r in rows if g is None]
    for g, r in zip(GENERATIONS[::2], base_rows, strict=True):
        assert r.text and g["base_completion"].startswith(r.text), (r.text, g["base_completion"])


# ---- batch invariance --------------------------------------------------------------------------


def test_random_adapters_change_the_output(engine):
    """The random adapters used below are not no-ops: each changes some greedy continuation."""
    for name, ref in engine.randoms.items():
        changed = False
        for prompt in engine.chat_prompts[:2]:
            base = engine.greedy(prompt, 6).tokens
            if engine.greedy(prompt, 6, ref).tokens != base:
                changed = True
                break
        assert changed, f"adapter {name} does not change the output"


class AloneCache:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.results: dict[tuple, list[int]] = {}

    def get(self, prompt: list[int], adapter: AdapterRef | None, max_new: int) -> list[int]:
        key = (tuple(prompt), adapter.name if adapter else None, max_new)
        if key not in self.results:
            self.results[key] = self.engine.greedy(prompt, max_new, adapter).tokens
        return self.results[key]


def compare_with_alone(engine: Engine, alone: AloneCache, prompt, adapter, max_new, got: list[int],
                       near_ties: list) -> None:
    want = alone.get(prompt, adapter, max_new)
    if got == want:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    gaps = engine.alone_gaps(prompt, adapter, want[: k + 1])
    gap = gaps[k] if k < len(gaps) else float("nan")
    detail = (f"adapter={adapter.name if adapter else None} prompt_len={len(prompt)} max_new={max_new} "
              f"first difference at token {k}: batched {got} vs alone {want}; alone top-2 logit gap there {gap:.3g}")
    assert gap < NEAR_TIE, "batched greedy output differs from the same request alone: " + detail
    near_ties.append(detail)


@pytest.mark.parametrize("seed", range(6))
def test_batch_invariance_random_mixes(engine, seed):
    rng = random.Random(seed)
    vocab = len(engine.base.tokenizer)
    adapters = [None, engine.emoji, *engine.randoms.values()]
    if seed == 0:  # make sure the unshared f+l adapter appears at least once together with others
        adapters = [engine.randoms["split"], engine.emoji, None]
    specs = []
    for _ in range(rng.randint(3, 8)):
        if rng.random() < 0.3:
            prompt = rng.choice(engine.chat_prompts + [g["prompt_ids"] for g in GENERATIONS])
        else:
            prompt = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 3, rng.randint(1, 80)]))]
        specs.append((prompt, rng.choice(adapters), rng.randint(1, 12)))
    engine.assert_idle()
    # random arrival: a first wave, then later waves after a short sleep or once some tokens came out
    cut = sorted(rng.sample(range(1, len(specs)), k=min(2, len(specs) - 1)))
    waves = [specs[: cut[0]], specs[cut[0] : cut[-1]], specs[cut[-1] :]]
    results = []
    for w, wave in enumerate(waves):
        if w and results:
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                results[0][1].wait_tokens(rng.randint(1, 4))
        for prompt, adapter, max_new in wave:
            results.append(((prompt, adapter, max_new),
                            engine.submit(prompt, SamplingParams(max_new_tokens=max_new), adapter)[1]))
    for _, r in results:
        r.wait()
    alone = AloneCache(engine)
    near_ties: list[str] = []
    for (prompt, adapter, max_new), r in results:
        assert r.finish in ("stop", "length")
        assert r.text == engine.decode(r.tokens)
        compare_with_alone(engine, alone, prompt, adapter, max_new, r.tokens, near_ties)
    if near_ties:
        print("near ties accepted:", *near_ties, sep="\n")
    assert len(near_ties) <= 1, near_ties


def small_scheduler(engine: Engine, **kw) -> EngineLoop:
    """A second scheduler on the same runner: use it only while the module's scheduler is idle."""
    opts = dict(max_batch_size=1, max_queue=2, max_prefill_tokens=8192, max_prompt_tokens=MAX_PROMPT_TOKENS,
                max_context=MAX_CONTEXT)
    task_budget = kw.pop("task_budget", 0.05)
    opts.update(kw)
    policy = Scheduler(engine.runner.cache, engine.cache.get, **opts)
    return EngineLoop(engine.runner, policy, engine.decode, eos_token_ids=[EOS], task_budget=task_budget)


@contextmanager
def running(sch: EngineLoop) -> Iterator[EngineLoop]:
    """Run `sch` for the block; stop it however the block ends."""
    sch.start()
    try:
        yield sch
    finally:
        sch.stop()


def test_batch_invariance_with_a_full_batch_and_a_small_prefill_budget(engine):
    """Admission split by max_prefill_tokens and by a full batch; queued requests join mid-decode."""
    rng = random.Random(1234)
    vocab = len(engine.base.tokenizer)
    adapters = [None, engine.emoji, *engine.randoms.values()]
    specs = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))], rng.choice(adapters), rng.randint(2, 8))
             for _ in range(7)]
    specs.append((GENERATIONS[3]["prompt_ids"], engine.emoji, 10))
    engine.assert_idle()
    with running(small_scheduler(engine, max_batch_size=3, max_queue=16, max_prefill_tokens=64)) as sch:
        results = [engine.submit(p, SamplingParams(max_new_tokens=n), a, sch=sch)[1] for p, a, n in specs]
        for r in results:
            r.wait()
    alone = AloneCache(engine)
    near_ties: list[str] = []
    for (prompt, adapter, max_new), r in zip(specs, results, strict=True):
        compare_with_alone(engine, alone, prompt, adapter, max_new, r.tokens, near_ties)
    assert len(near_ties) <= 1, near_ties


def test_an_idle_engine_prefills_a_burst_as_one_batch(engine):
    """Requests arriving a little apart at an idle engine share one prefill; a lone one waits `batch_quiet`."""
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    adapters = [engine.emoji, None, next(iter(engine.randoms.values()))]
    engine.assert_idle()
    with running(small_scheduler(engine, max_batch_size=4, max_queue=8, batch_wait=3.0, batch_quiet=0.4)) as sch:
        burst = []
        for prompt, adapter in zip(engine.chat_prompts, adapters, strict=False):
            burst.append(engine.submit(prompt, params, adapter, sch=sch)[1])
            time.sleep(0.05)
        for r in burst:
            r.wait()
        assert sch.stats().prefills == 1

        started = time.monotonic()
        engine.submit(engine.chat_prompts[0], params, sch=sch)[1].wait_tokens(1)
        assert sch.stats().prefills == 2 and 0.4 <= time.monotonic() - started < 3.0
    for prompt, adapter, r in zip(engine.chat_prompts, adapters, burst, strict=False):
        assert r.tokens == engine.run(prompt, params, adapter).tokens

    with running(small_scheduler(engine, max_batch_size=4, max_queue=8, batch_wait=30.0, batch_quiet=30.0)) as sch:
        started = time.monotonic()
        full = [engine.submit(engine.chat_prompts[i % 3], params, sch=sch)[1] for i in range(4)]
        full[0].wait_tokens(1)
        assert time.monotonic() - started < 15  # a full batch does not wait for more
        assert sch.stats().prefills == 1

    prompt = engine.chat_prompts[0]
    budget_of_two = small_scheduler(engine, max_batch_size=8, max_queue=8, max_prefill_tokens=2 * len(prompt),
                                    batch_wait=30.0, batch_quiet=30.0)
    with running(budget_of_two) as sch:
        started = time.monotonic()
        both = [engine.submit(prompt, params, sch=sch)[1] for _ in range(2)]
        both[0].wait_tokens(1)
        assert time.monotonic() - started < 15  # the prefill budget is full: no reason to wait
        assert sch.stats().prefills == 1


# ---- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine):
    prompt = engine.chat_prompts[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = engine.run(prompt, params).tokens
    assert len(alone) == 10
    engine.assert_idle()
    others = [
        engine.submit(engine.chat_prompts[1], SamplingParams(max_new_tokens=6, temperature=1.0, seed=7))[1],
        engine.submit(GENERATIONS[0]["prompt_ids"], SamplingParams(max_new_tokens=8), engine.emoji)[1],
    ]
    again = engine.submit(prompt, params)[1]
    others.append(engine.submit(engine.chat_prompts[2], SamplingParams(max_new_tokens=12, temperature=0.5))[1])
    assert again.wait().tokens == alone
    for r in others:
        r.wait()


def test_different_seeds_give_different_samples(engine):
    prompt = engine.chat_prompts[0]
    outs = {tuple(engine.run(prompt, SamplingParams(max_new_tokens=6, temperature=1.2, seed=s, ignore_eos=True))
                  .tokens) for s in range(3)}
    assert len(outs) > 1


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    prompt = engine.chat_prompts[2]
    greedy = engine.greedy(prompt, 8).tokens
    assert engine.run(prompt, SamplingParams(max_new_tokens=8, temperature=0.8, top_k=1, seed=3)).tokens == greedy
    assert engine.run(prompt, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=1e-6, seed=4)).tokens == greedy


def test_logit_bias_and_penalties_reach_the_sampler(engine):
    prompt = engine.chat_prompts[2]
    greedy = engine.greedy(prompt, 6, ignore_eos=True).tokens
    forced = engine.run(prompt, SamplingParams(max_new_tokens=3, logit_bias=((42, 100.0),), ignore_eos=True))
    assert forced.tokens == [42, 42, 42]
    banned = engine.run(prompt, SamplingParams(max_new_tokens=6, logit_bias=((greedy[0], -100.0),), ignore_eos=True))
    assert banned.tokens[0] != greedy[0]
    # a strong repetition penalty on the prompt's and the output's tokens: no token comes twice
    penalised = engine.run(prompt, SamplingParams(max_new_tokens=6, repetition_penalty=100.0, ignore_eos=True))
    assert len(set(penalised.tokens)) == 6 and not set(penalised.tokens) & set(prompt)
    with pytest.raises(EngineError, match="logprobs") as exc:
        engine.submit(prompt, SamplingParams(logprobs=21))
    assert exc.value.status == 400


def _token_boundaries(engine: Engine, ids: list[int]) -> list[int]:
    return [len(engine.decode(ids[:k])) for k in range(len(ids) + 1)]


def test_stop_strings_truncate_and_never_leak(engine):
    prompt = GENERATIONS[0]["prompt_ids"]
    full = engine.greedy(prompt, 16)
    text, ids = full.text, full.tokens
    assert len(text) > 12
    bounds = _token_boundaries(engine, ids)
    # a stop string spanning three tokens, starting and ending inside tokens where possible
    k = next(i for i in range(2, len(ids) - 2) if bounds[i] - bounds[i - 1] >= 2 and bounds[i + 2] - bounds[i + 1] >= 2)
    stop = text[bounds[k] - 1 : bounds[k + 1] + 1]
    cases = [(stop,), ("never appears here", stop), ("no such text",)]
    for stops in cases:
        r = engine.run(prompt, SamplingParams(max_new_tokens=16, stop=stops))
        starts = [text.find(s) for s in stops if s in text]
        if not starts:
            assert r.finish == full.finish and r.text == text and r.tokens == ids
            continue
        cut = min(starts)
        assert r.finish == "stop"
        assert r.text == text[:cut]
        assert all(s not in r.text for s in stops)
        # generation stops at the first token whose text completes the stop string
        n = next(i for i in range(len(ids) + 1) if any(s in engine.decode(ids[:i]) for s in stops))
        assert r.tokens == ids[:n]
        # no streamed delta ever carried part of the stop string
        streamed = ""
        for e in r.events:
            streamed += e.text
            assert text[:cut].startswith(streamed)


def test_stop_string_inside_multibyte_emoji_output(engine):
    g = GENERATIONS[0]  # "Paris 🇫🇷🗼✨"
    r = engine.run(g["prompt_ids"], SamplingParams(max_new_tokens=32, stop=("🗼",)), engine.emoji)
    assert r.finish == "stop"
    assert r.text == g["completion"].split("🗼")[0]
    assert all("\ufffd" not in e.text for e in r.events)
    # without stop strings the partial UTF-8 of every emoji is held back until complete
    r = engine.greedy(g["prompt_ids"], 32, engine.emoji)
    assert all("\ufffd" not in e.text for e in r.events) and r.text == g["completion"]
    assert any(e.text == "" for e in r.events[:-1])


def test_stop_token_ids_max_new_tokens_and_ignore_eos(engine):
    g = GENERATIONS[0]
    want = g["completion_ids"]  # ends with EOS after 12 tokens
    assert want[-1] == EOS
    # a stop token: the token is reported, its text is not
    stop_at = next(i for i in range(2, len(want)) if want[i] not in want[:i])
    r = engine.run(g["prompt_ids"], SamplingParams(max_new_tokens=32, stop_token_ids=(want[stop_at],)), engine.emoji)
    assert r.finish == "stop" and r.tokens == want[: stop_at + 1]
    assert r.text == engine.decode(want[:stop_at])
    # max_new_tokens
    r = engine.greedy(g["prompt_ids"], 5, engine.emoji)
    assert r.finish == "length" and r.tokens == want[:5] and len(r.events) == 5
    r = engine.greedy(g["prompt_ids"], 1, engine.emoji)
    assert r.finish == "length" and r.tokens == want[:1]
    # ignore_eos: runs through the EOS to max_new_tokens
    r = engine.greedy(g["prompt_ids"], len(want) + 3, engine.emoji, ignore_eos=True)
    assert r.finish == "length" and len(r.tokens) == len(want) + 3 and r.tokens[: len(want)] == want
    # EOS itself: finish "stop", EOS reported as the last token
    r = engine.greedy(g["prompt_ids"], 32, engine.emoji)
    assert r.finish == "stop" and r.tokens == want


# ---- cancellation ------------------------------------------------------------------------------


def test_cancel_in_the_event_callback_frees_the_slot_before_the_next_step(engine):
    engine.assert_idle()
    sch = engine.sch
    prompt = engine.chat_prompts[0]
    seen: dict[str, object] = {}

    def cancel_after_three(result: Result, event: Event) -> None:
        if len(result.tokens) == 3 and "steps" not in seen and event.finish_reason is None:
            seen["steps"] = sch.stats().steps
            seen["running"] = sch.num_running
            victim_request.cancel()
        if event.finish_reason == "cancelled":
            seen["cancelled_steps"] = sch.stats().steps

    def watch_running(result: Result, event: Event) -> None:
        if "cancelled_steps" in seen and "running_after" not in seen:
            seen["running_after"] = sch.num_running

    victim = Result()
    victim.hook = cancel_after_three
    victim_request = GenerationRequest(list(prompt), SamplingParams(max_new_tokens=60, ignore_eos=True), None, victim)
    other = Result()
    other.hook = watch_running
    sch.submit(victim_request)
    sch.submit(GenerationRequest(list(GENERATIONS[1]["prompt_ids"]), SamplingParams(max_new_tokens=12),
                                 engine.emoji, other))
    victim.wait()
    other.wait()
    assert victim.finish == "cancelled"
    assert victim.tokens == victim.tokens[:3] and len(victim.tokens) == 3, "tokens arrived after cancel()"
    assert victim.after_finish == []
    assert seen["cancelled_steps"] == seen["steps"], "a decode step ran before the cancelled slot was freed"
    assert seen["running_after"] == seen["running"] - 1
    # the rest of the batch carried on unchanged
    assert other.tokens == GENERATIONS[1]["completion_ids"][:12]
    time.sleep(0.05)
    assert victim.after_finish == []


def test_cancel_from_another_thread_mid_generation(engine):
    engine.assert_idle()
    sch = engine.sch
    at_cancelled: dict[str, int] = {}

    def record(result: Result, event: Event) -> None:
        if event.finish_reason == "cancelled":
            at_cancelled["steps"] = sch.stats().steps

    victim = Result()
    victim.hook = record
    victim_req = GenerationRequest(list(engine.chat_prompts[1]), SamplingParams(max_new_tokens=80, ignore_eos=True),
                                   None, victim)
    sch.submit(victim_req)
    others = [engine.submit(g["prompt_ids"], SamplingParams(max_new_tokens=10), engine.emoji)[1]
              for g in GENERATIONS[2:4]]
    victim.wait_tokens(2)
    steps, running, had = sch.stats().steps, sch.num_running, len(victim.tokens)
    victim_req.cancel()
    victim.wait()
    assert victim.finish == "cancelled"
    assert len(victim.tokens) <= had + 1  # the token of the step in flight, at most
    assert at_cancelled["steps"] <= steps + 1  # freed before any step after the one in flight
    for g, r in zip(GENERATIONS[2:4], others, strict=True):
        r.wait()
        assert r.tokens == g["completion_ids"][:10]
    assert running >= 1
    engine.assert_idle()
    time.sleep(0.05)
    assert victim.after_finish == []


# ---- limits ------------------------------------------------------------------------------------


def test_prompt_and_context_limits(engine):
    sch = engine.sch
    with pytest.raises(PromptTooLong, match=rf"{MAX_PROMPT_TOKENS + 1}.*{MAX_PROMPT_TOKENS}") as exc:
        sch.policy.check(MAX_PROMPT_TOKENS + 1, 1)
    assert exc.value.status == 400
    with pytest.raises(PromptTooLong, match=rf"{MAX_PROMPT_TOKENS + 1}.*{MAX_PROMPT_TOKENS}"):
        sch.submit(GenerationRequest([5] * (MAX_PROMPT_TOKENS + 1), SamplingParams(max_new_tokens=1), None, Result()))
    with pytest.raises(PromptTooLong, match=r"100 tokens.*8100.*8200.*8192"):
        sch.policy.check(100, 8100)
    with pytest.raises(PromptTooLong, match=r"8200.*8192"):
        sch.submit(GenerationRequest([5] * 100, SamplingParams(max_new_tokens=8100), None, Result()))
    sch.policy.check(MAX_PROMPT_TOKENS, MAX_CONTEXT - MAX_PROMPT_TOKENS)  # exactly at the limits: fine
    with pytest.raises(PromptTooLong):
        sch.policy.check(MAX_PROMPT_TOKENS, MAX_CONTEXT - MAX_PROMPT_TOKENS + 1)
    with pytest.raises(EngineError, match="empty") as exc:
        sch.submit(GenerationRequest([], SamplingParams(max_new_tokens=4), None, Result()))
    assert exc.value.status == 400
    assert sch.num_waiting == 0


def test_queue_full_and_cancel_while_waiting(engine):
    small = small_scheduler(engine, max_batch_size=1, max_queue=2)
    params = SamplingParams(max_new_tokens=4)
    accepted = []
    # not started, so nothing runs: the queue holds max_queue plus the free batch slots
    for _ in range(3):
        accepted.append(engine.submit([1, 2, 3], params, sch=small))
    with pytest.raises(QueueFull, match=r"\b2\b") as exc:
        engine.submit([1, 2, 3], params, sch=small)
    assert exc.value.status == 429
    assert small.num_waiting == 3
    # cancelled while still waiting: a "cancelled" event once the loop sees it, no tokens
    engine.assert_idle()  # the small scheduler shares the runner; the main one must be idle
    for request, _ in accepted:
        request.cancel()
    small.start()
    try:
        for _, result in accepted:
            result.wait(30)
            assert result.finish == "cancelled" and result.tokens == []
    finally:
        small.stop()
    with pytest.raises(EngineStopped):
        engine.submit([1, 2, 3], params, sch=small)


# ---- robustness: tiny temperatures, cancellation while queued, broken consumers -----------------


def test_tiny_temperature_does_not_fail_the_rest_of_the_batch(engine):
    prompt = engine.chat_prompts[3]
    want = engine.greedy(prompt, 4, ignore_eos=True).tokens
    engine.assert_idle()
    bystander = engine.submit(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))[1]
    offender = engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=1e-40, ignore_eos=True))[1]
    bystander.wait()
    offender.wait()
    assert bystander.finish == "length" and bystander.tokens == want
    assert offender.finish == "length" and offender.tokens == want  # T -> 0 is greedy


def test_cancel_while_queued_behind_a_full_batch_is_prompt(engine):
    engine.assert_idle()
    with running(small_scheduler(engine, max_batch_size=1)) as sch:
        long = engine.submit(engine.chat_prompts[0], SamplingParams(max_new_tokens=30, ignore_eos=True), sch=sch)[1]
        queued_req, queued = engine.submit(engine.chat_prompts[1], SamplingParams(max_new_tokens=4), sch=sch)
        long.wait_tokens(2)
        queued_req.cancel()
        assert queued.done.wait(WAIT_S)
        finished_first = not long.done.is_set()
        long.wait()
    assert queued.finish == "cancelled" and queued.tokens == []
    assert finished_first, "the cancelled queued request got its event only after the running one finished"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_raising_consumer_of_a_cancelled_queued_request_does_not_kill_the_engine(engine):
    engine.assert_idle()
    sch = small_scheduler(engine, max_batch_size=2)

    def broken(event: Event) -> None:
        raise RuntimeError("the consumer went away")

    doomed = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=2), None, broken)
    sch.submit(doomed)
    doomed.cancel()
    _, later = engine.submit(engine.chat_prompts[3], SamplingParams(max_new_tokens=2), sch=sch)
    with running(sch):
        deadline = time.monotonic() + 60
        while not later.done.is_set() and sch._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert later.done.is_set(), "the engine thread died"


# ---- TextTracker (no model) ---------------------------------------------------------------------


def byte_decoder(vocab: dict[int, bytes]):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def feed(tracker: TextTracker, tokens: list[int]) -> list[tuple[str, bool]]:
    out = [tracker.add(t) for t in tokens]
    if not out or not out[-1][1]:
        out.append(tracker.add(None))
    return out


def test_text_tracker_holds_back_incomplete_utf8():
    smile = "😀".encode()  # 4 bytes, one token each
    vocab = {i: bytes([b]) for i, b in enumerate(smile)} | {10: b"a", 11: "é".encode()[:1], 12: "é".encode()[1:]}
    tracker = TextTracker(byte_decoder(vocab), ())
    deltas = [tracker.add(t)[0] for t in [10, 0, 1, 2, 3, 11, 12, 10]]
    assert deltas == ["a", "", "", "", "😀", "", "é", "a"]
    assert tracker.add(None) == ("", False)
    # an incomplete character at the very end is flushed as-is when the stream ends
    tracker = TextTracker(byte_decoder(vocab), ())
    assert [tracker.add(t)[0] for t in [10, 0, 1]] == ["a", "", ""]
    assert tracker.add(None) == ("\ufffd", False)


def test_text_tracker_stop_string_split_across_tokens():
    pieces = ["Hel", "lo ", "wo", "rld", "!", " more"]
    vocab = {i: p.encode() for i, p in enumerate(pieces)}
    for stop, want in [("o wor", "Hell"), ("world", "Hello "), ("!", "Hello world"), ("lo", "Hel"),
                       ("Hello world! more", ""), ("zzz", "Hello world! more")]:
        tracker = TextTracker(byte_decoder(vocab), (stop,))
        out = feed(tracker, list(range(len(pieces))))
        streamed = "".join(d for d, _ in out)
        assert streamed == want, stop
        assert stop not in streamed
        assert out[-1][1] == (stop in "Hello world! more")
        partial = ""
        for delta, _ in out:
            partial += delta
            assert want.startswith(partial)  # never a character that is later taken back


def test_text_tracker_earliest_of_several_stops_and_emoji_stop():
    pieces = ["a", "b", "c", "d", "e"]
    vocab = {i: p.encode() for i, p in enumerate(pieces)}
    tracker = TextTracker(byte_decoder(vocab), ("de", "bc", "xyz"))
    out = feed(tracker, [0, 1, 2, 3, 4])
    assert "".join(d for d, _ in out) == "a" and out[-1][1]
    smile = "😀".encode()
    vocab = {0: b"hi ", 1: smile[:2], 2: smile[2:], 3: b" there"}
    tracker = TextTracker(byte_decoder(vocab), ("😀",))
    out = feed(tracker, [0, 1, 2, 3])
    assert "".join(d for d, _ in out) == "hi " and all("\ufffd" not in d for d, _ in out)


def test_text_tracker_matches_a_full_decode_with_the_real_tokenizer(engine):
    """Windowed decoding gives the text of decoding everything at once, whatever the tokens."""
    rng = random.Random(5)
    vocab = len(engine.base.tokenizer)
    emoji_ids = engine.base.tokenizer("😀 é ñ 漢字 ... don't , . !", add_special_tokens=False)["input_ids"]
    for _ in range(20):
        ids = [rng.choice(emoji_ids) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randint(1, 80))]
        tracker = TextTracker(engine.decode, ())
        streamed = "".join(d for d, _ in feed(tracker, ids))
        assert streamed == engine.decode(ids)


# ---- the KV cache, chunked prefill, admission by memory, failures that stay with their request ---


@contextmanager
def kv_cache_of(engine: Engine, budget_tokens: int) -> Iterator[KVCache]:
    """Give the runner a small KV cache for the block (only while the module's scheduler is idle)."""
    engine.assert_idle()
    config, kept = engine.base.model.config, engine.runner.cache
    small = KVCache.for_model(config, engine.base.dtype, engine.base.device, budget_tokens * kept.bytes_per_token)
    engine.runner.cache = small
    try:
        yield small
    finally:
        engine.runner.cache = kept


def test_chunked_prefill_keeps_pyreft_parity(engine):
    """Prompts spread over 5-token chunks (the last two intervened positions often in two different
    chunks), alone and all together, give pyreft's exact tokens."""
    assert all(len(g["prompt_ids"]) > 2 * 5 for g in GENERATIONS)
    engine.assert_idle()
    with running(small_scheduler(engine, max_batch_size=8, max_queue=8, max_prefill_tokens=5,
                                 prefill_chunk_tokens=5)) as sch:
        first = engine.submit(GENERATIONS[0]["prompt_ids"], SamplingParams(max_new_tokens=32), engine.emoji, sch=sch)
        assert first[1].wait().tokens == GENERATIONS[0]["completion_ids"]
        assert sch.stats().prefills == -(-len(GENERATIONS[0]["prompt_ids"]) // 5)
        results = [engine.submit(g["prompt_ids"], SamplingParams(max_new_tokens=32), engine.emoji, sch=sch)[1]
                   for g in GENERATIONS]
        for g, r in zip(GENERATIONS, results, strict=True):
            assert r.wait().tokens == g["completion_ids"], g["question"]


def test_prefill_computes_the_real_tokens_only(engine):
    """A long prompt beside short ones is packed, not padded: positions computed = prompt tokens."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in (300, 12, 40, 7, 25)]
    engine.assert_idle()
    before = engine.sch.stats().prefill_positions
    results = [engine.submit(p, SamplingParams(max_new_tokens=1))[1] for p in prompts]
    for r in results:
        r.wait()
    assert engine.sch.stats().prefill_positions - before == sum(len(p) for p in prompts)


def copied_bytes(engine: Engine, rows: list[DecodeRow]) -> int:
    """Bytes read by copying ops (cat, copy, clone, gathers) in one decode step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.runner.decode(rows)
    copying = ("aten::cat", "aten::copy_", "aten::clone", "aten::index_select", "aten::contiguous", "aten::gather")
    total = 0
    for event in prof.events():
        if event.name in copying:
            for shape in event.input_shapes:
                if shape:
                    n = 1
                    for d in shape:
                        n *= d
                    total += 4 * n
    return total


def test_a_decode_step_copies_nothing_that_grows_with_the_cache(engine):
    """The same decode step at 20 and at 600 tokens of context moves the same bytes: KV is read in place.

    (Both in slots of one size, so that the rows are grouped alike.)"""
    engine.assert_idle()
    kv = engine.runner.cache
    rng = random.Random(2)
    measured = []
    for context in (20, 600):
        prompts = [[rng.randrange(3, 40000) for _ in range(context)] for _ in range(3)]
        slots = [kv.allocate(900) for _ in prompts]
        try:
            engine.runner.prefill([PrefillChunk(p, 0, context, s) for p, s in zip(prompts, slots, strict=True)])
            measured.append(copied_bytes(engine, [DecodeRow(5, context, s) for s in slots]))
        finally:
            for slot in slots:
                kv.free(slot)
    assert measured[1] == measured[0], measured


def test_rows_join_and_leave_without_touching_other_rows_kv(engine):
    engine.assert_idle()
    kv = engine.runner.cache
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in (30, 50, 20)]
    slots = [kv.allocate(len(p) + 4) for p in prompts]
    try:
        engine.runner.prefill([PrefillChunk(p, 0, len(p), s) for p, s in zip(prompts[:2], slots[:2], strict=True)])
        a = slots[0]

        def columns() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.stack([k[:, a.start : a.start + 30] for k in kv.k]),
                    torch.stack([v[:, a.start : a.start + 30] for v in kv.v]))

        snapshot = columns()
        engine.runner.prefill([PrefillChunk(prompts[2], 0, 20, slots[2])])  # a row joins
        engine.runner.decode([DecodeRow(7, 50, slots[1]), DecodeRow(8, 20, slots[2])])  # others decode
        kv.free(slots.pop(1))  # a row leaves
        assert torch.equal(columns()[0], snapshot[0])
        assert torch.equal(columns()[1], snapshot[1])
    finally:
        for slot in slots:
            kv.free(slot)


def test_admission_waits_for_kv_memory_and_refuses_what_can_never_fit(engine):
    """With room for two rows, a third waits for a slot (it is not failed), then runs as it would alone."""
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 40000) for _ in range(40)] for _ in range(3)]
    alone = [engine.run(p, SamplingParams(max_new_tokens=3, ignore_eos=True)).tokens for p in prompts]
    with kv_cache_of(engine, 2048) as kv, running(small_scheduler(engine, max_batch_size=8, max_queue=8)) as sch:
        params = SamplingParams(max_new_tokens=kv.capacity // 2 - 40, ignore_eos=True)  # each holds half the cache
        submitted = [engine.submit(p, params, sch=sch) for p in prompts]
        for _, r in submitted[:2]:
            r.wait_tokens(3)
        assert (sch.num_running, sch.num_waiting, kv.usage) == (2, 1, 1.0)
        submitted[0][0].cancel()
        submitted[2][1].wait_tokens(3)
        assert [r.tokens[:3] for _, r in submitted] == alone
        assert submitted[0][1].finish == "cancelled" and submitted[2][1].finish is None
        with pytest.raises(PromptTooLong, match=r"needs \d+ tokens of KV cache \(\d+ bytes\) .* holds \d+ tokens"):
            sch.policy.check(40, kv.capacity)
        for request, _ in submitted:
            request.cancel()
    assert kv.usage == 0.0


POISON = 49151  # a token id no test prompt contains


@contextmanager
def poisoned(engine: Engine, *, position: int | None = None, kill: bool = False) -> Iterator[None]:
    """Make any forward whose input holds POISON (or, with `position`, a token at that position) raise."""

    class EngineKilled(BaseException):
        pass

    def check(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
        if (ids is not None and bool((ids == POISON).any())) or (
            position is not None and positions is not None and bool((positions == position).any())
        ):
            raise EngineKilled("injected") if kill else RuntimeError("injected fault")

    # On the decoder, which every step of a model the lean forward does not serve runs
    handle = engine.base.model.model.register_forward_pre_hook(check, with_kwargs=True)
    lean = engine.runner.lean  # the default model's prefills and eager decode steps run this forward, not the model's

    class LeanChecked:
        """The lean forward, checked; its other attributes (the LM head) as they are."""

        def __call__(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, *rest: object) -> torch.Tensor:
            check(engine.base.model, (), {"input_ids": ids, "position_ids": positions})
            return lean(cache, ids, positions, *rest)

        def hidden(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, *rest: object) -> torch.Tensor:
            check(engine.base.model, (), {"input_ids": ids, "position_ids": positions})
            return lean.hidden(cache, ids, positions, *rest)

        def __getattr__(self, name: str) -> object:
            return getattr(lean, name)

    engine.runner.lean = LeanChecked() if lean is not None else None
    try:
        yield
    finally:
        handle.remove()
        engine.runner.lean = lean


def test_a_failing_prefill_or_decode_fails_its_own_request_only(engine):
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in (21, 33, 27)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [engine.run(p, params, a).tokens for p, a in zip(prompts, [None, engine.emoji, None], strict=True)]
    victim = [rng.randrange(3, 40000) for _ in range(70)]
    engine.assert_idle()
    with poisoned(engine):
        results = [engine.submit(p, params, a)[1] for p, a in zip(prompts, [None, engine.emoji, None], strict=True)]
        bad = engine.submit(victim[:35] + [POISON] + victim[35:], params)[1]
        assert bad.wait().finish == "error" and "injected fault" in bad.events[-1].error
        assert [r.wait().tokens for r in results] == alone
    engine.assert_idle()
    with poisoned(engine, position=len(victim) + 3):  # the victim's 4th decode step fails
        results = [engine.submit(p, params, a)[1] for p, a in zip(prompts, [None, engine.emoji, None], strict=True)]
        bad = engine.submit(victim, params)[1]
        assert bad.wait().finish == "error" and len(bad.tokens) == 4
        assert [r.wait().tokens for r in results] == alone


def test_a_dead_engine_thread_fails_everyone_at_once_and_says_so(engine):
    engine.assert_idle()
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    with running(small_scheduler(engine, max_batch_size=4, max_queue=4)) as sch:
        assert sch.alive
        streaming = engine.submit(engine.chat_prompts[0], params, sch=sch)[1]
        streaming.wait_tokens(2)
        queued = [engine.submit(engine.chat_prompts[1], params, sch=sch)[1] for _ in range(2)]
        with poisoned(engine, kill=True):
            engine.submit(engine.chat_prompts[2][:9] + [POISON], params, sch=sch)
            for r in [streaming, *queued]:
                assert r.wait(timeout=30).finish == "error"
        assert not sch.alive
        assert "EngineKilled" in streaming.events[-1].error
        with pytest.raises(EngineStopped, match="EngineKilled"):
            sch.submit(GenerationRequest(engine.chat_prompts[0], params, None, Result()))


def test_a_warm_up_that_fails_stops_start_with_its_error(engine, monkeypatch):
    """The engine thread warms the runner up before it serves (the compiled step's CUDA graphs are per thread):
    start() waits for it, and a failure there is start()'s error, not a server that hangs or says it is up."""
    engine.assert_idle()

    def broken() -> None:
        raise RuntimeError("no graphs today")

    sch = small_scheduler(engine)
    monkeypatch.setattr(engine.runner, "warm_up", broken)
    with pytest.raises(RuntimeError, match="could not start: RuntimeError: no graphs today"):
        sch.start()
    assert not sch.alive
    with pytest.raises(EngineStopped):
        sch.submit(GenerationRequest(engine.chat_prompts[0], SamplingParams(), None, Result()))


class CountingTask:
    """A background task of `steps` steps; `raise_at` makes that step raise."""

    def __init__(self, steps: int, raise_at: int | None = None) -> None:
        self.steps, self.raise_at, self.done, self.failed = steps, raise_at, 0, None

    def step(self, budget: float) -> bool:
        if self.done == self.raise_at:
            raise RuntimeError("task broke")
        self.done += 1
        return self.done >= self.steps

    def fail(self, message: str) -> None:
        self.failed = message


class OverrunningTask:
    """A background task whose every step takes `seconds`, more than its budget; it records the budget it was given
    and whether a request was being served at each step."""

    def __init__(self, sch: EngineLoop, seconds: float) -> None:
        self.sch, self.seconds, self.budgets, self.serving = sch, seconds, [], []
        self.stop, self.finished, self.failed = False, False, None

    def step(self, budget: float) -> bool:
        self.budgets.append(budget)
        self.serving.append(self.sch.num_running > 0)
        time.sleep(self.seconds)
        self.finished = self.stop
        return self.finished

    def fail(self, message: str) -> None:
        self.failed = message


def test_background_tasks_take_one_step_per_engine_iteration_and_fail_alone(engine):
    engine.assert_idle()
    prompt = engine.chat_prompts[0]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = engine.run(prompt, params).tokens
    finishing, breaking = CountingTask(3), CountingTask(50, raise_at=2)
    steps_before = engine.sch.stats().steps
    engine.sch.add_task(finishing)
    engine.sch.add_task(breaking)
    result = engine.submit(prompt, params)[1].wait()
    deadline = time.monotonic() + 30
    while (finishing.done < 3 or breaking.failed is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert result.tokens == alone  # serving went on, with the same tokens
    assert finishing.done == 3 and finishing.failed is None
    assert breaking.done == 2 and "task broke" in breaking.failed
    assert engine.sch.stats().steps - steps_before >= 2  # the tasks took turns with decode steps


def test_a_task_step_that_overruns_its_budget_is_paid_back_by_later_iterations(engine):
    """A step five budgets long runs about once per five decode steps while a request is served, back to back
    when nothing is."""
    engine.assert_idle()
    sch = small_scheduler(engine, task_budget=0.01)
    with running(sch):
        task = OverrunningTask(sch, seconds=0.05)
        sch.add_task(task)
        assert wait_for(lambda: len(task.budgets) >= 3, timeout=30)  # idle: back to back
        steps_before, calls_before = sch.stats().steps, len(task.serving)
        engine.submit(engine.chat_prompts[0], SamplingParams(max_new_tokens=40, ignore_eos=True), sch=sch)[1].wait()
        decode_steps, task_steps = sch.stats().steps - steps_before, sum(task.serving[calls_before:])
        task.stop = True
        assert wait_for(lambda: task.finished, timeout=30)
    assert set(task.budgets) == {0.01} and task.failed is None
    assert decode_steps >= 39 and 2 <= task_steps <= decode_steps // 5 + 2, (decode_steps, task_steps)


# ---- logprobs --------------------------------------------------------------------------------


def reference_logprobs(engine: Engine, ids: list[int], prompt_length: int, adapter: AdapterRef | None) -> torch.Tensor:
    """log_softmax of a plain transformers forward over `ids` [L', V] (server/reference.py's `plain_logits`)."""
    from server.reference import plain_logits

    return plain_logits(engine.base, ids, prompt_length, adapter.adapter if adapter else None).log_softmax(-1)


def check_logprobs(engine: Engine, prompt: list[int], result: Result, adapter: AdapterRef | None, top: int) -> None:
    """Every prompt and generated token's logprob and top alternatives equal the reference forward's."""
    first = result.events[0]
    generated = result.tokens
    ref = reference_logprobs(engine, prompt + generated, len(prompt), adapter)
    echoed = first.prompt_logprobs
    assert echoed is not None and len(echoed) == len(prompt) - 1
    sampled = [lp for e in result.events for lp in e.logprobs]
    assert len(sampled) == len(generated)
    for position, (token, lp) in enumerate(zip(prompt[1:] + generated, list(echoed) + sampled, strict=True)):
        want = ref[position]
        assert lp.logprob == pytest.approx(float(want[token]), abs=LOGPROB_ABS), position
        assert len(lp.top) == top
        values = [v for _, v in lp.top]
        assert values == pytest.approx(want.topk(top).values.tolist(), abs=LOGPROB_ABS), position
        assert all(float(want[t]) == pytest.approx(v, abs=LOGPROB_ABS) for t, v in lp.top)
    for lp in sampled:  # greedy: the chosen token is the most likely one
        assert lp.logprob == pytest.approx(lp.top[0][1], abs=1e-6)


@pytest.mark.parametrize("which", ["base", "emoji", "lo", "split"])
def test_logprobs_equal_a_plain_forward_with_the_intervention_hooks(engine, which):
    """Prompt (echo) and generated logprobs come from the serving forward, interventions included, and equal
    a plain transformers forward's log-softmax with reference hooks within LOGPROB_ABS (fp32)."""
    adapter = None if which == "base" else engine.emoji if which == "emoji" else engine.randoms[which]
    prompt = engine.chat_prompts[1]
    result = engine.run(prompt, SamplingParams(max_new_tokens=6, logprobs=3, prompt_logprobs=3), adapter)
    check_logprobs(engine, prompt, result, adapter, 3)


def test_logprobs_are_the_same_alone_and_in_a_mixed_chunked_batch(engine):
    """Rows with and without echo, with different adapters, prefilled in 7-token chunks beside each other:
    each row's logprobs equal its alone run's."""
    cases = [(engine.chat_prompts[i % 4], adapter) for i, adapter in
             enumerate([None, engine.emoji, engine.randoms["lo"], engine.randoms["split"], engine.emoji, None])]
    params = SamplingParams(max_new_tokens=5, logprobs=2, prompt_logprobs=2)
    alone = [engine.run(prompt, params, adapter) for prompt, adapter in cases]
    with running(small_scheduler(engine, max_batch_size=8, max_queue=8, max_prefill_tokens=7,
                                 prefill_chunk_tokens=7)) as sch:
        plain = engine.submit(engine.chat_prompts[3], SamplingParams(max_new_tokens=20), None, sch=sch)[1]
        batched = [engine.submit(prompt, params, adapter, sch=sch)[1] for prompt, adapter in cases]
        for want, got in zip(alone, batched, strict=True):
            got.wait()
            assert got.tokens == want.tokens
            pairs = list(zip(want.events[0].prompt_logprobs, got.events[0].prompt_logprobs, strict=True))
            pairs += list(zip([lp for e in want.events for lp in e.logprobs],
                              [lp for e in got.events for lp in e.logprobs], strict=True))
            for a, b in pairs:
                assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_ABS)
                assert [t for t, _ in a.top] == [t for t, _ in b.top] or abs(a.top[0][1] - a.top[1][1]) < NEAR_TIE
        assert plain.wait().events[0].prompt_logprobs is None and not plain.events[0].logprobs


def test_max_tokens_zero_returns_the_prompt_logprobs_and_generates_nothing(engine):
    prompt = engine.chat_prompts[2]
    result = engine.run(prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0), engine.emoji)
    assert len(result.events) == 1 and result.tokens == [] and result.finish == "length"
    event = result.events[0]
    assert event.completion_tokens == 0 and event.prompt_tokens == len(prompt)
    ref = reference_logprobs(engine, prompt, len(prompt), engine.emoji)
    assert [lp.logprob for lp in event.prompt_logprobs] == pytest.approx(
        [float(ref[i, t]) for i, t in enumerate(prompt[1:])], abs=LOGPROB_ABS)
    assert all(lp.top == () for lp in event.prompt_logprobs)
