"""No per-request state outlives its request: what a row leaves behind in its KV slot or its Sampler
row never reaches the next request there.

The engine is built directly (no HTTP), as in test_engine.py, on the real default model with a
small batch, so that rows and slots are reused often.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator

import pytest
import torch

from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler
from server.model import BaseModel, load_base_model
from tests.test_engine import EOS, Result, random_adapter

pytestmark = pytest.mark.slow

MAX_ROWS = 4
MAX_CONTEXT = 2048


@pytest.fixture(scope="module")
def base() -> BaseModel:
    torch.manual_seed(0)
    return load_base_model()


@pytest.fixture(scope="module")
def runner(base: BaseModel) -> ModelRunner:
    return ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 256 << 20))


def greedy(runner: ModelRunner, rows: list[tuple[list[int], object]], steps: int) -> list[list[int]]:
    """Greedy tokens of rows (prompt, slot) prefilled together and decoded together for `steps` steps."""
    chunks = [PrefillChunk(p, 0, len(p), s) for p, s in rows]
    tokens = [[t] for t in runner.prefill(chunks).logits.argmax(-1).tolist()]
    for _ in range(steps - 1):
        decode = [DecodeRow(t[-1], len(p) + len(t) - 1, s) for (p, s), t in zip(rows, tokens, strict=True)]
        for t, token in zip(tokens, runner.decode(decode).argmax(-1).tolist(), strict=True):
            t.append(token)
    return tokens


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_slot_an_earlier_row_filled_with_nan_or_inf_gives_the_next_row_its_tokens_alone(base, runner, poison):
    """An earlier row's KV (an fp16 overflow, say) is left in its slot; the next row there decodes beside a
    longer row of the same block, so eager decode reads its slot past its own length behind the mask."""
    kv = runner.cache
    rng = random.Random(7)
    short, long = [rng.randrange(3, 40000) for _ in range(6)], [rng.randrange(3, 40000) for _ in range(40)]
    slot = kv.allocate(64)
    alone = greedy(runner, [(short, slot)], 8)[0]
    kv.free(slot)

    earlier = kv.allocate(64)
    greedy(runner, [(long + long[:20], earlier)], 4)  # a row that writes 63 columns of its slot
    for pool in (*kv.k, *kv.v):
        pool[:, earlier.start : earlier.start + 63] = poison
    kv.free(earlier)
    mine, beside = kv.allocate(64), kv.allocate(64)
    try:
        assert mine.start == earlier.start and beside.block == mine.block
        got = greedy(runner, [(short, mine), (long, beside)], 8)
    finally:
        kv.free(mine)
        kv.free(beside)
    assert got[0] == alone


# ---- random joins and leaves with random sampling parameters, against each request alone -----------


@pytest.fixture(scope="module")
def scheduler(base: BaseModel, runner: ModelRunner) -> Iterator[tuple[EngineLoop, list[AdapterRef | None]]]:
    """A small batch over the module's runner, so that Sampler rows and KV slots are reused all the time."""
    cache = DeviceAdapterCache(base.device, base.dtype, 1 << 26, set())
    lo = random_adapter(base, [("loreft", 3, 8), ("loreft", 9, 8)], "f3+l3", True, seed=1, strength=3.0)
    policy = Scheduler(runner.cache, cache.get, max_batch_size=MAX_ROWS, max_queue=64, max_prefill_tokens=4096,
                       max_prompt_tokens=1024, max_context=MAX_CONTEXT)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
                     eos_token_ids=[EOS])
    sch.start()
    yield sch, [None, AdapterRef("lo", 1, lo)]
    sch.stop()


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """Any mix of what a request may ask for; strong biases, so that one reaching another row shows."""
    kw: dict = {"max_new_tokens": rng.randint(1, 8), "ignore_eos": rng.random() < 0.7}
    if rng.random() < 0.4:  # always seeded: an unseeded draw cannot be compared with its run alone
        kw |= {"temperature": rng.uniform(0.5, 1.3), "seed": rng.randrange(2**31), "top_p": rng.choice([1.0, 0.9, 0.5]),
               "top_k": rng.choice([0, 0, 5, 50])}
    if rng.random() < 0.5:
        kw["logit_bias"] = tuple((rng.randrange(vocab), rng.choice([100.0, -100.0, rng.uniform(-5, 5)]))
                                 for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([0.7, 1.3, 2.0])
    if rng.random() < 0.3:
        kw |= {"frequency_penalty": rng.uniform(-1, 2), "presence_penalty": rng.uniform(-1, 2)}
    if rng.random() < 0.4:
        kw["logprobs"] = rng.randint(0, 20)
    if rng.random() < 0.2:
        kw["stop"] = (rng.choice([" the", ".", "\n", "e"]),)
    if rng.random() < 0.1:
        kw["stop_token_ids"] = (rng.randrange(vocab),)
    return SamplingParams(**kw)


def run(sch: EngineLoop, prompt: list[int], params: SamplingParams, adapter: AdapterRef | None) -> tuple:
    result = Result()
    request = GenerationRequest(list(prompt), params, adapter, result)
    sch.submit(request)
    return request, result


def outcome(result: Result) -> tuple:
    """What a request got back: tokens, text, how it finished, and per token its logprob and its alternatives'
    (sorted by value: alternatives whose logprobs are equal to the last bit may come in either order)."""
    logprobs = [[lp.logprob, *sorted(v for _, v in lp.top)] for e in result.events for lp in e.logprobs]
    return result.tokens, result.text, result.finish, logprobs


def same_logprobs(got: list[list[float]], want: list[list[float]]) -> bool:
    """As many tokens with as many alternatives each, equal up to float noise (rows batched or alone)."""
    return [len(g) for g in got] == [len(w) for w in want] and all(
        g == pytest.approx(w, abs=1e-3) for g, w in zip(got, want, strict=True))


def test_random_joins_and_leaves_give_every_request_its_output_alone(base, scheduler):
    """Requests with random parameters (bias, penalties, logprobs, seeds, truncation, stops, an adapter) join a
    batch of MAX_ROWS rows at random times and leave as they finish or are cancelled; every one gets what it
    gets alone. Greedy and seeded picks are compared exactly: a float near-tie (below 1e-4 between the two best
    scores, test_engine.py) is rare enough over these ~70 tokens not to be allowed for."""
    sch, adapters = scheduler
    rng = random.Random(0)
    vocab = len(base.tokenizer)
    chat = base.tokenizer.apply_chat_template([{"role": "user", "content": "Describe the sea in one sentence."}],
                                              add_generation_prompt=True, tokenize=True)
    specs = []
    for _ in range(16):
        prompt = list(chat) if rng.random() < 0.3 else [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        specs.append((prompt, random_params(rng, vocab), rng.choice(adapters), rng.random() < 0.15))
    submitted: list[tuple] = []
    for prompt, params, adapter, cancel in specs:
        if submitted and rng.random() < 0.5:  # join later: once an earlier request has some tokens, or soon
            if rng.random() < 0.5:
                rng.choice(submitted)[1].wait_tokens(rng.randint(1, 3))
            else:
                time.sleep(rng.uniform(0.0, 0.05))
        request, result = run(sch, prompt, params, adapter)
        if cancel:  # leave early: cancelled after its first token
            result.hook = lambda r, e, request=request: request.cancel() if len(r.tokens) >= 1 else None
        submitted.append((request, result))
    for _, result in submitted:
        result.wait()
    while sch.num_running or sch.num_waiting:
        time.sleep(0.01)
    for (prompt, params, adapter, cancel), (_, result) in zip(specs, submitted, strict=True):
        alone = run(sch, prompt, params, adapter)[1].wait()
        got, want = outcome(result), outcome(alone)
        detail = f"{params} adapter={adapter and adapter.name} prompt={prompt[:8]}...: batched {got} vs alone {want}"
        if cancel and result.finish == "cancelled":  # what it got before it left
            want = (want[0][: len(got[0])], got[1], got[2], want[3][: len(got[3])])
        assert got[:3] == want[:3], detail
        assert same_logprobs(got[3], want[3]), detail
