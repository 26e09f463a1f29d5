"""The scheduling policy alone (server/engine/scheduler.py): fake rows, a fake KV allocator, no model.

Each test drives `schedule()` and `update()` the way `EngineLoop` does, and reads the plans.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from server.engine.adapter_cache import AdapterRef, ResidentAdapter
from server.engine.kv_cache import CacheFull, Slot
from server.engine.prefix_cache import PrefixCache
from server.engine.sampling import SamplingParams
from server.engine.scheduler import (
    EngineError,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    RowOutput,
    Scheduler,
    Sequence,
    StepPlan,
)


class FakeKV:
    """A KV allocator of `capacity` columns that grants exactly what is asked, first fit."""

    bytes_per_token = 10

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[int, Slot] = {}  # start -> slot
        self.copies: list[tuple[int, int, int]] = []  # (from column, to column, columns)
        self._next = 0

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_token

    @property
    def usage(self) -> float:
        return sum(s.size for s in self.held.values()) / self.capacity

    def slot_size(self, tokens: int) -> int:
        return tokens

    def allocate(self, tokens: int) -> Slot:
        if sum(s.size for s in self.held.values()) + tokens > self.capacity:
            raise CacheFull(tokens)
        slot = Slot(0, len(self.held), tokens, self._next, 1)
        self._next += tokens
        self.held[slot.start] = slot
        return slot

    def free(self, slot: Slot) -> None:
        assert self.held.pop(slot.start) == slot, "freed twice"

    @property
    def used_tokens(self) -> int:
        return sum(s.size for s in self.held.values())

    def writing(self, slot: Slot, end: int) -> None:
        assert slot.start in self.held and end <= slot.size

    def copy(self, pairs: list[tuple[int, int]], tokens: int) -> None:
        self.copies.extend((src, dst, tokens) for src, dst in pairs)


class FakeAdapters:
    """Makes adapters resident; the names in `broken` fail to load."""

    def __init__(self, broken: Iterable[str] = ()) -> None:
        self.broken = set(broken)
        self.loaded: list[str] = []

    def __call__(self, ref: AdapterRef) -> ResidentAdapter:
        if ref.name in self.broken:
            raise RuntimeError(f"no room for {ref.name}")
        self.loaded.append(ref.name)
        return ResidentAdapter(None, (), 0)  # type: ignore[arg-type]


def policy(capacity: int = 10_000, adapters: FakeAdapters | None = None, **kw) -> Scheduler:
    opts = dict(max_batch_size=4, max_queue=8, max_prefill_tokens=1000, max_prompt_tokens=900, max_context=1000,
                prefill_chunk_tokens=16)
    opts.update(kw)
    return Scheduler(FakeKV(capacity), adapters or FakeAdapters(), **opts)  # type: ignore[arg-type]


def request(prompt: int, max_new: int = 4, adapter: str | None = None, at: float = 0.0) -> GenerationRequest:
    ref = AdapterRef(adapter, 1, None) if adapter else None  # type: ignore[arg-type]
    return GenerationRequest(list(range(1, prompt + 1)), SamplingParams(max_new_tokens=max_new), ref,
                             lambda event: None, arrival=at)


def run(sch: Scheduler, plan: StepPlan, finish: dict[Sequence, str] | None = None) -> list[Sequence]:
    """Report the plan as done: every chunk computed, a token for every row that samples, "length" at max_tokens
    (or the reason in `finish`); return the retired rows."""
    finish = finish or {}

    def end(seq: Sequence) -> str | None:
        return finish.get(seq) or ("length" if len(seq.token_ids) + 1 >= seq.request.params.max_new_tokens else None)

    outputs = [RowOutput(c.seq, c.length, 7, end(c.seq)) if c.completes_prompt else RowOutput(c.seq, c.length)
               for c in plan.prefill]
    retired = sch.update(outputs)
    decoding = [s for s in plan.decode if not s.finished]
    return retired + sch.update([RowOutput(s, token=7, finish_reason=end(s)) for s in decoding])


def test_admission_is_first_come_first_served_up_to_the_batch_size():
    sch = policy(max_batch_size=3)
    requests = [request(4) for _ in range(5)]
    for r in requests:
        sch.add(r)
    plan = sch.schedule()
    assert [s.request for s in plan.admitted] == requests[:3]
    assert [s.row for s in plan.admitted] == [0, 1, 2]
    assert list(sch.waiting) == requests[3:]
    assert sch.schedule().admitted == ()  # no free row until one retires


def test_admission_waits_for_kv_and_never_lets_a_later_request_overtake():
    sch = policy(capacity=100)
    big, small = request(50, 40), request(2, 2)  # 90 columns, then 4
    sch.add(request(20, 10))  # 30 columns
    first = sch.schedule().admitted[0]
    sch.add(big)
    sch.add(small)
    plan = sch.schedule()
    assert plan.admitted == ()  # big does not fit in the 70 left, and small may not jump the queue
    assert list(sch.waiting) == [big, small]
    assert sch.kv.usage == 0.3
    retired = sch.finish(first, "stop")
    assert retired == [first] and sch.kv.usage == 0
    assert [s.request for s in sch.schedule().admitted] == [big, small]


def test_running_rows_are_never_evicted_for_waiting_ones():
    sch = policy(capacity=220)
    sch.add(request(10, 200))
    row = sch.schedule().admitted[0]
    for _ in range(5):
        sch.add(request(5, 5))
    admitted = []
    while sch.waiting or sch.num_running > 1:
        plan = sch.schedule()
        admitted += plan.admitted
        assert sch.num_running <= 2 and len(admitted) <= 5  # newcomers take the 10 columns left, one at a time
        assert row in plan.decode and sch.kv.held[row.slot.start] is row.slot  # never pre-empted nor shrunk
        run(sch, plan)
    assert len(admitted) == 5 and not row.finished


def test_prefill_budget_is_a_chunk_while_decoding_and_the_burst_budget_when_idle():
    sch = policy(max_prefill_tokens=100, prefill_chunk_tokens=16)
    sch.add(request(70, 10))
    sch.add(request(50, 10))
    plan = sch.schedule()
    assert [(c.start, c.length) for c in plan.prefill] == [(0, 70), (0, 30)]  # idle: 100 tokens, in arrival order
    assert [s.request.prompt_ids[-1] for s in plan.decode] == [70]  # the first completes its prompt: it decodes too
    run(sch, plan)
    plan = sch.schedule()
    assert [(c.start, c.length) for c in plan.prefill] == [(30, 16)]  # a row decodes: one chunk of 16
    assert len(plan.decode) == 1
    run(sch, plan)
    plan = sch.schedule()
    assert [(c.start, c.length, c.completes_prompt) for c in plan.prefill] == [(46, 4, True)]
    assert len(plan.decode) == 2
    run(sch, plan)
    assert len(sch.running) == 2 and not sch.prefilling
    assert [len(s.token_ids) for s in sch.running] == [4, 2]  # first token from the prefill, then a decode each step
    assert all(s.computed == len(s.prompt) for s in sch.running)


def test_a_long_prompt_is_spread_over_steps_without_stalling_decoding_rows():
    sch = policy(prefill_chunk_tokens=8)
    sch.add(request(3, 100))
    run(sch, sch.schedule())
    sch.add(request(30))
    lengths = []
    while sch.prefilling or sch.waiting:
        plan = sch.schedule()
        assert sch.running[0] in plan.decode  # the running row decodes every step
        lengths.append(sum(c.length for c in plan.prefill))
        run(sch, plan)
    assert lengths == [8, 8, 8, 6]


def test_a_row_admitted_with_its_prefix_computed_is_prefilled_from_there():
    class WithPrefix(Scheduler):
        def _reserve(self, request: GenerationRequest) -> Sequence | None:
            seq = super()._reserve(request)
            if seq is not None:
                seq.computed = 24  # what a prefix cache hit copied into the slot
            return seq

    sch = WithPrefix(FakeKV(1000), FakeAdapters(), max_batch_size=2, max_queue=2, max_prefill_tokens=100,
                     max_prompt_tokens=100, max_context=200)
    sch.add(request(30))
    plan = sch.schedule()
    assert [(c.start, c.length, c.completes_prompt) for c in plan.prefill] == [(24, 6, True)]
    run(sch, plan)
    assert sch.running[0].computed == 30


def test_retirement_gives_back_the_reservation_and_the_row():
    sch = policy(max_batch_size=2)
    for _ in range(3):
        sch.add(request(5, 3))
    a, b = sch.schedule().admitted
    plan = sch.schedule()
    retired = run(sch, plan, finish={a: "stop"})
    assert retired == [a] and a.finish_reason == "stop" and sch.running == [b]
    assert a.slot.start not in sch.kv.held
    (c,) = sch.schedule().admitted
    assert c.row == a.row  # the row a left is the one the next request takes


def test_a_row_that_asks_for_no_tokens_does_not_decode():
    sch = policy()
    sch.add(request(5, 0))
    plan = sch.schedule()
    assert plan.prefill[0].completes_prompt and plan.decode == ()
    retired = sch.update([RowOutput(plan.prefill[0].seq, 5, finish_reason="length")])
    assert retired == [plan.prefill[0].seq] and sch.idle and sch.kv.usage == 0


def test_cancellation_anywhere_in_the_queue_and_of_held_rows():
    sch = policy(max_batch_size=1)
    held, queued, last = request(5), request(5), request(5)
    for r in (held, queued, last):
        sch.add(r)
    (seq,) = sch.schedule().admitted
    queued.cancel()
    plan = sch.schedule()
    assert plan.cancelled == (queued,) and list(sch.waiting) == [last]
    held.cancel()
    plan = sch.schedule()
    assert plan.retired == (seq,) and seq.finish_reason == "cancelled" and sch.kv.usage == 0
    assert seq not in plan.decode and all(c.seq is not seq for c in plan.prefill)
    assert plan.admitted == ()  # a step admits before it retires cancelled rows: their room serves the next step
    assert [s.request for s in sch.schedule().admitted] == [last]


def test_an_adapter_that_cannot_load_fails_its_request_alone():
    adapters = FakeAdapters(broken={"bad"})
    sch = policy(adapters=adapters, max_prefill_tokens=12)
    good, bad, other = request(6, adapter="ok"), request(6, adapter="bad"), request(6)
    for r in (good, bad, other):
        sch.add(r)
    plan = sch.schedule()
    assert [s.request for s in plan.admitted] == [good, other]
    ((failed, message),) = plan.failed
    assert failed.request is bad and "no room for bad" in message and failed.finish_reason == "error"
    assert [c.seq.request for c in plan.prefill] == [good, other]  # the budget goes to the rows that joined
    assert len(sch.kv.held) == 2 and adapters.loaded == ["ok"]


def test_queue_bound_and_refusals_with_their_numbers():
    sch = policy(max_batch_size=2, max_queue=1, capacity=500)
    for _ in range(3):  # the queue takes max_queue beyond the batch's free rows
        sch.add(request(3))
    with pytest.raises(QueueFull):
        sch.add(request(3))
    (a, _) = sch.schedule().admitted  # two join, one waits: no free row, so no room beyond max_queue
    with pytest.raises(QueueFull, match=r"the queue is full \(1 requests waiting\)"):
        sch.add(request(3))
    sch.finish(a, "stop")
    sch.add(request(3))
    with pytest.raises(EngineError, match="empty"):
        sch.check(0, 1)
    with pytest.raises(PromptTooLong, match="901 tokens; this server accepts at most 900"):
        sch.check(901, 1)
    with pytest.raises(PromptTooLong, match="1001 exceeds the model's context of 1000"):
        sch.check(900, 101)
    with pytest.raises(PromptTooLong, match="needs 600 tokens of KV cache"):
        sch.check(100, 500)
    sch.check(100, 400)


def test_an_idle_engine_waits_for_a_burst_only_while_it_keeps_arriving():
    sch = policy(batch_wait=1.0, batch_quiet=0.1, max_batch_size=3, max_prefill_tokens=100)
    assert sch.burst_wait(0.0) == 0.0  # nothing waiting
    sch.add(request(5, at=10.0))
    assert sch.burst_wait(10.0) == pytest.approx(0.1)  # a lone request waits batch_quiet
    sch.add(request(5, at=10.08))
    assert sch.burst_wait(10.1) == pytest.approx(0.08)  # quiet since the last arrival
    assert sch.burst_wait(10.2) == 0.0
    sch.add(request(90, at=10.15))
    assert sch.burst_wait(10.15) == 0.0  # the prefill budget is full (or the batch: three waiting)


def test_abort_retires_every_row_and_empties_the_queue():
    sch = policy(max_batch_size=2)
    requests = [request(5) for _ in range(3)]
    for r in requests:
        sch.add(r)
    sch.schedule()
    retired, waiting = sch.abort()
    assert [s.request for s in retired] == requests[:2] and waiting == requests[2:]
    assert sch.idle and not sch.waiting and sch.kv.usage == 0


# ---- the prefix cache's decisions ----------------------------------------------------------------


def cached_policy(capacity: int = 10_000, **kw) -> Scheduler:
    return policy(capacity, prefix=PrefixCache(32), **kw)


def test_a_repeated_prompt_starts_after_its_cached_blocks():
    sch = cached_policy()
    first = request(80)
    sch.add(first)
    plan = sch.schedule()
    assert plan.prefill[0].start == 0
    run(sch, plan)  # prompt complete: its two full blocks are stored, copied out of the row's columns
    kv: FakeKV = sch.kv  # type: ignore[assignment]
    assert len(sch.prefix) == 2 and len(kv.copies) == 2
    again = request(80)
    sch.add(again)
    plan = sch.schedule()
    seq = plan.admitted[0]
    # blocks [0, 64) copied in; the last 16 tokens (the prompt's last always among them) are computed
    assert seq.cached == seq.computed == 64 and plan.prefill[-1].start == 64 and plan.prefill[-1].length == 16
    assert [c[1] for c in kv.copies[-2:]] == [seq.slot.start, seq.slot.start + 32]


def test_cached_blocks_are_free_space_that_admission_evicts():
    sch = cached_policy(capacity=200)
    for _ in range(3):  # different prompts, each leaving 2 blocks behind
        sch.add(GenerationRequest(list(range(100 * len(sch.prefix), 100 * len(sch.prefix) + 70)),
                                  SamplingParams(max_new_tokens=2), None, lambda event: None))
        while sch.has_work:
            run(sch, sch.schedule())
    assert len(sch.prefix) > 0 and sch.kv_usage() == 0
    big = request(150, 50)  # the whole pool: granted at once, every cached block evicted
    sch.add(big)
    assert [s.request for s in sch.schedule().admitted] == [big]
    assert len(sch.prefix) == 0


def test_a_failed_row_leaves_nothing_in_the_cache():
    sch = cached_policy()
    sch.add(request(80))
    plan = sch.schedule()
    seq = plan.admitted[0]
    sch.finish(seq, "error")
    assert len(sch.prefix) == 0


def test_retirement_stores_the_generated_blocks_and_an_echo_reuses_nothing():
    sch = cached_policy()
    sch.add(request(40, 40))
    while sch.has_work:
        run(sch, sch.schedule())
    assert len(sch.prefix) == 2  # 40 prompt + 39 generated tokens fed back: two full blocks
    echo = GenerationRequest(list(range(1, 41)), SamplingParams(max_new_tokens=1, prompt_logprobs=0), None,
                             lambda event: None)
    sch.add(echo)
    assert sch.schedule().admitted[0].computed == 0
