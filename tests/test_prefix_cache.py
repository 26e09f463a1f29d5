"""The prefix cache: exact keys (pure), and greedy tokens with the cache equal to those without it on
the real model, for base and adapter rows, multi-turn, mixed batches, chunked prefill, every pyreft
type (tests/data/pyreft-types) and compositions; eviction never refuses what would run without it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_engine import random_adapter, running

from server.adapter_file import Composite, import_pyreft
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.kv_cache import KVCache
from server.engine.loop import EngineLoop
from server.engine.output import Event
from server.engine.prefix_cache import PrefixCache, acting, block_keys
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler
from server.model import ModelShape, load_base_model
from server.positions import Positions

TYPES = Path(__file__).parent / "data" / "pyreft-types"
EXPECTED = json.loads((TYPES / "expected.json").read_text())
SHAPE = ModelShape(model_type="llama", hidden_size=576, num_layers=30)
B = 32
EOS = 2
NEAR_TIE = 1e-3  # as tests/test_engine.py: a different greedy token is accepted only at a float near-tie


# ---- keys: pure, no model --------------------------------------------------------------------------


def keys(tokens: list[int], positions: str | None, share: bool = True, n_iv: int = 2, name: str = "a",
         **kw) -> list[bytes]:
    acts = None
    if positions is not None:
        acts = acting(name, Positions.parse(positions).locations(len(tokens), n_iv, share))
    return list(block_keys(tokens, B, acts, **kw))


def shared(a: list[bytes], b: list[bytes]) -> int:
    """Leading blocks two key chains share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


PROMPT = list(range(100, 300))  # 200 tokens: 6 full blocks


def test_blocks_before_the_first_intervened_position_carry_the_base_key():
    base = keys(PROMPT, None)
    assert len(base) == 6
    # l5 acts on 195..199: blocks 0-5 end at 192, so all six are base blocks
    assert keys(PROMPT, "l5") == base
    # l10 acts on 190..199: block 5 ([160, 192)) holds 190 and 191
    assert shared(keys(PROMPT, "l10"), base) == 5
    assert shared(keys(PROMPT, "f1"), base) == 0
    assert shared(keys(PROMPT, "l5", name="a"), keys(PROMPT, "l5", name="b")) == 6


def test_first_positions_share_only_with_the_same_adapter():
    a, b = keys(PROMPT, "f3", name="a@1:x"), keys(PROMPT, "f3", name="b@1:y")
    assert shared(a, b) == 0
    longer = PROMPT + list(range(400, 500))  # a later turn: f3 acts on the same positions
    assert shared(keys(longer, "f3", name="a@1:x"), a) == 6
    assert shared(keys(longer, "f3", name="a@2:z"), a) == 0  # a replaced adapter: new version and sha


def test_last_positions_moving_to_a_longer_prompts_end():
    turn1 = keys(PROMPT, "l20")  # acts on 180..199: blocks 0-4 are base, block 5 is not
    turn2 = keys(PROMPT + list(range(400, 500)), "l20")  # acts on 280..299
    assert shared(turn1, turn2) == 5  # block 5 was intervened in turn 1, but not in turn 2


def test_capping_on_short_prompts_and_untied_weights():
    short = list(range(64))  # f40 is capped at 32 positions (pyreft: prompt_length // 2)
    long = short + list(range(1000, 1064))
    assert shared(keys(short, "f40"), keys(long, "f40")) == 1  # block 0 matches; block 1 held 32..39 only in long
    # untied f2+l2 with two interventions: the first takes the prefix, the second the suffix
    tied, untied = keys(PROMPT, "f2+l2", share=True), keys(PROMPT, "f2+l2", share=False)
    assert shared(tied, untied) == 0


def test_keyed_by_adapter_shares_nothing_across_adapters():
    a = keys(PROMPT, "l5", name="a", keyed_from=0)
    assert shared(a, keys(PROMPT, None, keyed_from=0)) == 0
    assert shared(a, keys(PROMPT, "l5", name="b", keyed_from=0)) == 0
    assert keys(PROMPT, "l5", name="a", keyed_from=0) == a


def test_continuing_a_chain_equals_keying_the_whole_sequence():
    acts = acting("a", Positions.parse("f2").locations(150, 1, True))
    whole = list(block_keys(PROMPT, B, acts))
    head = list(block_keys(PROMPT[:150], B, acts))
    tail = list(block_keys(PROMPT, B, acts, start=len(head), parent=head[-1]))
    assert head + tail == whole


def test_the_index_evicts_least_recently_used_chain_ends_first():
    cache: PrefixCache[str] = PrefixCache(B)
    chain = keys(PROMPT, None)[:3]
    for i, k in enumerate(chain):
        cache.insert(k, f"p{i}")
    cache.match(chain)
    assert cache.evict() == "p2" and cache.evict(keep=frozenset([chain[1]])) == "p0"
    assert cache.match(chain) == [] and len(cache) == 1


# ---- the engine ------------------------------------------------------------------------------------


@dataclass
class Out:
    tokens: list[int] = field(default_factory=list)
    cached: int = 0
    finish: str | None = None
    error: str | None = None

    def __call__(self, event: Event) -> None:
        self.tokens.extend(event.token_ids)
        self.cached = event.cached_tokens or self.cached
        if event.finish_reason:
            self.finish, self.error = event.finish_reason, event.error


@dataclass
class Engine:
    base: object
    runner: ModelRunner
    adapters: DeviceAdapterCache
    refs: dict[str, AdapterRef]
    system: list[int]

    def scheduler(self, cached: bool, **kw) -> EngineLoop:
        opts = dict(max_batch_size=32, max_queue=64, max_prefill_tokens=8192, max_prompt_tokens=4000,
                    max_context=8192)
        opts.update(kw)
        policy = Scheduler(self.runner.cache, self.adapters.get, prefix=PrefixCache(B) if cached else None, **opts)
        return EngineLoop(self.runner, policy, lambda ids: "", eos_token_ids=[EOS])

    def chat(self, history: list[dict]) -> list[int]:
        return list(self.base.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True))

    def top2_gap(self, prompt: list[int], adapter: AdapterRef | None, tokens: list[int]) -> float:
        """The top-2 logit gap before the last of `tokens`, computing the prompt alone (no scheduler running)."""
        resident = self.adapters.get(adapter) if adapter else None
        kv = self.runner.cache
        slot = kv.allocate(len(prompt) + len(tokens))
        try:
            logits = self.runner.prefill([PrefillChunk(prompt, 0, len(prompt), slot, resident)]).logits
            for i, token in enumerate(tokens[:-1]):
                logits = self.runner.decode([DecodeRow(token, len(prompt) + i, slot)])
            top = logits[0].topk(2).values
        finally:
            kv.free(slot)
        return float(top[0] - top[1])


def run(sch: EngineLoop, work: list[tuple[list[int], AdapterRef | None, int]]) -> list[Out]:
    """Submit `work` at once (one mixed batch) and wait for every answer."""
    outs = []
    for prompt, ref, max_new in work:
        out = Out()
        sch.submit(GenerationRequest(list(prompt), SamplingParams(max_new_tokens=max_new), ref, out))
        outs.append(out)
    end = time.monotonic() + 300
    while any(o.finish is None for o in outs):
        assert time.monotonic() < end, "the engine did not answer in time"
        time.sleep(0.005)
    for o in outs:
        assert o.finish in ("stop", "length"), o.error
    return outs


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    base = load_base_model()
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 30))
    adapters = DeviceAdapterCache(base.device, base.dtype, 1 << 28, set())
    refs = {
        "l4": AdapterRef("l4", 1, random_adapter(base, [("loreft", 3, 8), ("loreft", 9, 8)], "l4", True, 1, 3.0),
                         sha256="l4"),
        "f3": AdapterRef("f3", 1, random_adapter(base, [("noreft", 2, 4), ("direft", 6, 4)], "f3", True, 2, 3.0),
                         sha256="f3"),
        "fl": AdapterRef("fl", 1, random_adapter(base, [("noreft", 2, 4), ("direft", 6, 4), ("consreft", 2, 4),
                                                       ("nodireft", 12, 4)], "f2+l3", False, 3, 3.0), sha256="fl"),
    }
    refs["l4+fl"] = AdapterRef("l4+fl", 1, Composite((refs["l4"].adapter, refs["fl"].adapter)), sha256="l4+fl")
    for name, case in EXPECTED["cases"].items():
        refs[name] = AdapterRef(name, 1, import_pyreft(TYPES / name, case["positions"], case["share_weights"],
                                                       SHAPE, 64), sha256=name)
    system = list(base.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a careful assistant. " * 20}], tokenize=True))
    return Engine(base, runner, adapters, refs, system)


def check_same(engine: Engine, work, got: list[Out], want: list[Out]) -> int:
    """Every cached answer equals the uncached one, or differs first at a measured near-tie; returns the ties."""
    ties = 0
    for (prompt, ref, _), g, w in zip(work, got, want, strict=True):
        if g.tokens == w.tokens:
            continue
        k = next((i for i, (a, b) in enumerate(zip(g.tokens, w.tokens, strict=False)) if a != b),
                 min(len(g.tokens), len(w.tokens)))
        gap = engine.top2_gap(prompt, ref, w.tokens[: k + 1])
        assert gap < NEAR_TIE, f"{ref.name if ref else 'base'}: token {k} differs, top-2 gap {gap:.3g}"
        ties += 1
    return ties


def conversation_work(engine: Engine, names: list[str | None], turns: int, max_new: int, sch: EngineLoop):
    """Run `turns` turns of one conversation per name (all in one batch per turn) on `sch`."""
    histories = [[{"role": "system", "content": "You are a careful assistant. " * 20}] for _ in names]
    record = []
    for turn in range(turns):
        for h, name in zip(histories, names, strict=True):
            h.append({"role": "user", "content": f"Question {turn} from {name}: what is {turn} + {len(h)}?"})
        work = [(engine.chat(h), engine.refs[n] if n else None, max_new) for h, n in zip(histories, names,
                                                                                          strict=True)]
        outs = run(sch, work)
        for h, out in zip(histories, outs, strict=True):
            h.append({"role": "assistant", "content": engine.base.tokenizer.decode(out.tokens,
                                                                                    skip_special_tokens=True)})
        record.append((work, outs))
    return record


@pytest.mark.slow
def test_multi_turn_mixed_conversations_match_and_share(engine):
    names = [None, "l4", "f3", "fl", "l4+fl", None]
    with running(engine.scheduler(cached=True, prefill_chunk_tokens=64)) as sch:
        cached = conversation_work(engine, names, 3, 12, sch)
        computed = sch.stats().prefill_positions
    ties = 0
    with running(engine.scheduler(cached=False)) as sch:
        for work, outs in cached:
            ties += check_same(engine, work, outs, run(sch, work))
    assert ties <= 1
    sent = sum(len(p) for work, _ in cached for p, _, _ in work)
    assert computed < 0.6 * sent, (computed, sent)
    first, later = cached[0][1], [o for _, outs in cached[1:] for o in outs]
    assert first[0].cached == 0  # nothing was cached before the first batch
    assert all(o.cached > 0 for o in later), [o.cached for o in later]  # own earlier turns, or the base prefix


@pytest.mark.slow
def test_shared_document_across_adapters_and_the_fN_exception(engine):
    doc = engine.system
    questions = [engine.chat([{"role": "user", "content": f"Summarise point {i}."}]) for i in range(4)]
    work = [(doc + q, engine.refs[name] if name else None, 8)
            for q, name in zip(questions, ["l4", "noreft", "lobireft", None], strict=True)]
    f_work = [(doc + questions[0], engine.refs["f3"], 8)]
    with running(engine.scheduler(cached=True)) as sch:
        run(sch, [(doc + [1, 2], None, 1)])  # a base request warms the document
        got = run(sch, work)
        f_got = run(sch, f_work)
    with running(engine.scheduler(cached=False)) as sch:
        assert check_same(engine, work + f_work, got + f_got, run(sch, work + f_work)) <= 1
    whole = (len(doc) // B) * B
    assert all(o.cached >= whole for o in got), [o.cached for o in got]
    assert f_got[0].cached == 0  # its first positions are intervened: no base block is its block


@pytest.mark.slow
def test_every_pyreft_type_matches_pyreft_from_the_cache(engine):
    """Each case's prompts: warmed by a base request, then the adapter twice (l-only types reuse the base block,
    every type reuses its own), all answers pyreft's own."""
    with running(engine.scheduler(cached=True)) as sch:
        for name, case in EXPECTED["cases"].items():
            ref = engine.refs[name]
            prompts = [g["prompt_ids"] for g in case["generations"]]
            run(sch, [(p, None, 1) for p in prompts])
            for attempt in range(2):
                outs = run(sch, [(p, ref, EXPECTED["max_new_tokens"]) for p in prompts])
                for g, out in zip(case["generations"], outs, strict=True):
                    want = g["completion_ids"]
                    stopped = out.finish == "stop" and out.tokens[-1:] != [EOS]
                    got = out.tokens + [EOS] * stopped
                    assert got == want, (name, attempt)
                    if attempt or case["positions"].startswith("l"):
                        assert out.cached == B, (name, attempt, out.cached)
                    else:
                        assert out.cached == 0, (name, out.cached)


@pytest.mark.slow
def test_a_replaced_adapter_never_matches_its_old_blocks(engine):
    old = engine.refs["f3"]
    new = AdapterRef("f3", 2, engine.refs["fl"].adapter, sha256="other")
    prompt = engine.system + [5, 6, 7]
    with running(engine.scheduler(cached=True)) as sch:
        run(sch, [(prompt, old, 2)])
        assert run(sch, [(prompt, new, 2)])[0].cached == 0
        assert run(sch, [(prompt, old, 2)])[0].cached > 0


@pytest.mark.slow
def test_eviction_never_refuses_what_runs_without_the_cache(engine):
    """A pool of 512 tokens: every prompt's blocks fill it, and each admission evicts what it needs."""
    small = KVCache.for_model(engine.base.model.config, engine.base.dtype, engine.base.device,
                              512 * engine.runner.cache.bytes_per_token)
    saved = engine.runner.cache
    engine.runner.cache = small
    try:
        sch = engine.scheduler(cached=True, max_batch_size=2)
        prompts = [[(i * 37 + j) % 4000 + 10 for j in range(200)] for i in range(6)]
        with running(sch):
            for p in prompts:
                out = run(sch, [(p, None, 4)])[0]
                assert out.finish == "length"
            assert len(sch.prefix) > 0
            end = time.monotonic() + 10
            while sch.num_running and time.monotonic() < end:  # the last row retires just after its final event
                time.sleep(0.005)
            assert sch.stats().kv_usage == 0.0  # cached blocks are free space
            # a reservation as large as the pool evicts every cached block and runs
            assert run(sch, [(prompts[0] + prompts[1][:280], None, 2)])[0].finish in ("stop", "length")
    finally:
        engine.runner.cache = saved
