"""The batched device sampler: greedy parity, the sampled distribution, truncation, seeds,
penalties, logit bias, logprobs and the single host transfer per call.

Runs on the CPU, and on CUDA too where a GPU is present.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine.bounds import MAX_LOGPROBS
from server.engine.sampling import Sampler, SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
P_MIN = 1e-4  # a chi-square test fails below this p-value: a correct sampler fails one run in 10,000


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def slots_of(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against expected probabilities (cells with probability 0 excluded)."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    live = probs > 0
    expected = probs[live] * counts.sum()
    stat = ((counts[live] - expected) ** 2 / expected).sum()
    df = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int, device: torch.device) -> torch.Tensor:
    """n independent draws of one distribution: up to 1,000 rows with seeds 0, 1, ..., each drawing a few steps."""
    rows = min(n, 1000)
    sampler = Sampler(rows, logits.shape[-1], device)
    for slot in range(rows):
        sampler.add(slot, SamplingParams(**{**params.__dict__, "seed": slot}), [])
    batch, slots = logits.to(device).expand(rows, -1).contiguous(), slots_of(range(rows), device)
    draws = [t for _ in range(-(-n // rows)) for t in sampler(batch, slots).token_ids]
    return torch.tensor(draws[:n])


# ---- greedy ------------------------------------------------------------------------------------


def test_greedy_rows_are_argmax_bit_for_bit(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3000, generator=gen)
    logits[3, 17] = logits[3, 2900] = logits[3].max() + 1  # an exact tie: argmax's first index
    logits = logits.to(device)
    want = logits.argmax(-1).tolist()
    sampler = Sampler(16, 3000, device)
    order = [5, 0, 15, 3, 8, 1, 9, 2, 14, 7, 11, 4]
    for i, slot in enumerate(order):
        sampler.add(slot, SamplingParams(logprobs=3 if i % 3 == 0 else None), [1, 2, 3])
    assert sampler(logits, slots_of(order, device)).token_ids == want
    # other slots holding sampled, truncated, penalised and biased rows leave the greedy rows alone
    sampler.add(6, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.3), [5, 6])
    sampler.add(10, SamplingParams(temperature=1.0, frequency_penalty=0.5, logit_bias=((7, 5.0),)), [])
    mixed = torch.cat([logits, torch.randn(2, 3000, generator=gen).to(device)])
    out = sampler(mixed, slots_of([*order, 6, 10], device))
    assert out.token_ids[:12] == want


def test_tiny_temperature_and_top_k_one_pick_the_argmax(device):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(1)).to(device)
    want = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1e-6), SamplingParams(temperature=2.0, top_k=1),
                   SamplingParams(temperature=1.0, top_p=1e-9)):
        sampler = Sampler(8, 500, device)
        for slot in range(8):
            sampler.add(slot, SamplingParams(**{**params.__dict__, "seed": slot}), [])
        for _ in range(3):
            assert sampler(logits, slots_of(range(8), device)).token_ids == want


# ---- the sampled distribution ----------------------------------------------------------------


LOGITS = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0, 0.0, 2.5, -3.0])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_the_softmax_across_seeds(device, temperature):
    draws = draw_many(LOGITS, SamplingParams(temperature=temperature), 6000, device)
    counts = torch.bincount(draws, minlength=len(LOGITS))
    assert chi_square_p(counts, (LOGITS / temperature).softmax(-1)) > P_MIN


def test_draws_follow_the_softmax_across_steps(device):
    """One seeded row over many steps: the uniforms of successive steps are independent."""
    sampler = Sampler(1, len(LOGITS), device)
    sampler.add(0, SamplingParams(temperature=1.0, seed=42), [])
    logits, slots = LOGITS[None].to(device), slots_of([0], device)
    draws = torch.tensor([sampler(logits, slots).token_ids[0] for _ in range(4000)])
    counts = torch.bincount(draws, minlength=len(LOGITS))
    assert chi_square_p(counts, LOGITS.softmax(-1)) > P_MIN
    # pairs of successive draws are independent too
    pairs = torch.bincount(draws[:-1] * len(LOGITS) + draws[1:], minlength=len(LOGITS) ** 2)
    joint = torch.outer(LOGITS.softmax(-1), LOGITS.softmax(-1)).flatten()
    big = joint * 4000 >= 5  # cells expecting fewer than 5 draws are left out of the test
    assert chi_square_p(pairs[big], joint[big] / joint[big].sum()) > P_MIN


def reference_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The kept distribution, one token at a time in Python: top-k best, then the smallest prefix reaching top-p."""
    probs = (logits / temperature).softmax(-1)
    order = sorted(range(len(logits)), key=lambda t: -float(logits[t]))
    if top_k:
        order = order[:top_k]
    total = sum(float(probs[t]) for t in order)
    kept, mass = [], 0.0
    for t in order:
        kept.append(t)
        mass += float(probs[t]) / total
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.8), (5, 0.6), (0, 0.95)])
def test_truncation_never_leaves_the_kept_set_and_keeps_its_proportions(device, top_k, top_p):
    want = reference_kept(LOGITS, 0.9, top_k, top_p)
    draws = draw_many(LOGITS, SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p), 6000, device)
    counts = torch.bincount(draws, minlength=len(LOGITS))
    assert (counts[want == 0] == 0).all(), f"drew tokens outside the kept set: {counts.tolist()} vs {want.tolist()}"
    assert chi_square_p(counts, want) > P_MIN


def test_truncation_on_a_large_vocabulary(device):
    """Both candidate paths (top-k, full sort) on a real vocabulary size; nothing outside the kept set."""
    vocab = 49152
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 3
    for params in (SamplingParams(temperature=1.0, top_k=20), SamplingParams(temperature=1.0, top_p=0.5)):
        want = reference_kept(logits, 1.0, params.top_k, params.top_p)
        draws = draw_many(logits, params, 200, device)
        assert want[draws].min() > 0


# ---- seeds -----------------------------------------------------------------------------------


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
STEPS = 12
VOCAB = 2000


def step_logits(seed: int) -> torch.Tensor:
    """The logits a row sees at each step [STEPS, VOCAB]: a fixed sequence per seed."""
    return torch.randn(STEPS, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def run_rows(rows: list[tuple[SamplingParams, int, int, int]], device: torch.device, shuffle: int | None = None,
             max_rows: int = 8) -> list[list[int]]:
    """Run (params, slot, first step, last step) rows for STEPS calls; each row's logits come from step_logits(i)."""
    sampler = Sampler(max_rows, VOCAB, device)
    logits = [step_logits(i) for i in range(len(rows))]
    tokens: list[list[int]] = [[] for _ in rows]
    rng = random.Random(shuffle)
    for step in range(STEPS):
        for params, slot, first, last in rows:
            if step == first:
                sampler.add(slot, params, [1, 2, 3])
            if step == last:
                sampler.remove(slot)
        live = [i for i, (_, _, first, last) in enumerate(rows) if first <= step < last]
        if shuffle is not None:
            rng.shuffle(live)
        batch = torch.stack([logits[i][step - rows[i][2]] for i in live]).to(device)
        out = sampler(batch, slots_of([rows[i][1] for i in live], device))
        for i, token in zip(live, out.token_ids, strict=True):
            tokens[i].append(token)
    return tokens


def test_a_seed_gives_the_same_tokens_in_any_batch_slot_and_order(device):
    alone = run_rows([(SEEDED, 0, 0, STEPS)], device)[0]
    assert len(alone) == STEPS and len(set(alone)) > 1
    others = [
        (SamplingParams(temperature=1.0), 1, 0, STEPS),  # no truncation: this call's candidate path changes
        (SamplingParams(), 2, 0, 5),  # greedy, leaves early
        (SamplingParams(temperature=0.7, top_k=3, frequency_penalty=0.5, logprobs=2), 3, 2, STEPS),
        (SamplingParams(temperature=1.2, top_p=0.5, repetition_penalty=1.5, logit_bias=((9, 3.0),)), 7, 4, 9),
    ]
    for slot in (0, 5):
        for shuffle in (None, 1, 2):
            # the seeded row's logits are step_logits(0) wherever it sits, so it is listed first
            runs = run_rows([(SEEDED, slot, 0, STEPS), *others], device, shuffle)
            assert runs[0] == alone, (slot, shuffle)


def test_seeds_differ_and_unseeded_rows_differ(device):
    def tokens(params: SamplingParams) -> tuple[int, ...]:
        return tuple(run_rows([(params, 0, 0, STEPS)], device)[0])

    seeded = {tokens(SamplingParams(temperature=1.0, seed=s)) for s in range(4)}
    assert len(seeded) == 4
    assert tokens(SamplingParams(temperature=1.0, seed=7)) == tokens(SamplingParams(temperature=1.0, seed=7))
    assert tokens(SamplingParams(temperature=1.0)) != tokens(SamplingParams(temperature=1.0))


def test_a_slot_reused_starts_fresh(device):
    """A row leaving and a new one joining at its slot: step and counts restart."""
    params = SamplingParams(temperature=1.0, seed=5, frequency_penalty=1.0)
    logits = step_logits(0).to(device)
    sampler = Sampler(2, VOCAB, device)
    slots = slots_of([1], device)
    runs = []
    for _ in range(2):
        sampler.add(1, params, [])
        runs.append([sampler(logits[i : i + 1], slots).token_ids[0] for i in range(STEPS)])
        sampler.remove(1)
    assert runs[0] == runs[1]


# ---- no row state outlives its row --------------------------------------------------------------

# One row of each kind of per-row state: bias, prompt and output penalties, logprob widths, seeds and steps.
KINDS = {
    "plain": SamplingParams(),
    "biased": SamplingParams(logit_bias=((7, 100.0), (8, -5.0))),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "frequency": SamplingParams(frequency_penalty=1.0, presence_penalty=0.5),
    "logprobs": SamplingParams(logprobs=5),
    "seeded": SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3),
    "everything": SamplingParams(temperature=1.1, seed=4, logit_bias=((9, 100.0),), repetition_penalty=0.5,
                                 frequency_penalty=-0.5, logprobs=MAX_LOGPROBS),
}


def newcomer_run(params: SamplingParams, device: torch.device, before: SamplingParams | None = None) -> list:
    """(token, logprobs) of a row at slot 2 over STEPS calls on step_logits(0), prompt [1, 2, 3].

    With `before`: three rows with those parameters (another prompt, their own logits) first use slots 0-2
    for a few steps; those at slots 1 and 2 leave, and the one at slot 0 keeps running beside the new row.
    """
    sampler = Sampler(4, VOCAB, device)
    mine = step_logits(0).to(device)
    keeper = None
    if before is not None:
        for slot in range(3):
            sampler.add(slot, before, [7, 8, 9, 10])
        for step in range(4):
            sampler(step_logits(1)[step : step + 3].to(device), slots_of([0, 1, 2], device))
        sampler.remove(2)
        sampler.remove(1)
        keeper = step_logits(2).to(device)
    sampler.add(2, params, [1, 2, 3])
    out = []
    for step in range(STEPS):
        if keeper is None:
            got = sampler(mine[step : step + 1], slots_of([2], device))
        else:
            got = sampler(torch.stack([keeper[step], mine[step]]), slots_of([0, 2], device))
        out.append((got.token_ids[-1], got.logprobs[-1]))
    return out


@pytest.mark.parametrize("before", sorted(KINDS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_row_inherits_nothing_from_the_rows_that_held_its_slot(device, kind, before):
    """A row's tokens and logprobs are its own alone, after rows of another kind used its slot while one of
    them keeps running (so the batch still needs that kind's work: bias, penalties, logprobs)."""
    alone = newcomer_run(KINDS[kind], device)
    assert newcomer_run(KINDS[kind], device, KINDS[before]) == alone


# ---- penalties and bias --------------------------------------------------------------------------


def reference_scores(logits: list[float], prompt: list[int], generated: list[int], p: SamplingParams) -> list[float]:
    """Logit bias, then HF's repetition penalty, then OpenAI's frequency and presence penalties, one token at a time."""
    out = list(logits)
    for token, bias in p.logit_bias:
        out[token] += max(-100.0, min(100.0, bias))
    for token in set(prompt) | set(generated):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(generated):
        out[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
    return out


PENALISED = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(frequency_penalty=0.4),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.3, presence_penalty=0.6, repetition_penalty=1.1),
    SamplingParams(logit_bias=((3, 2.5), (11, -1.0), (0, -1e6))),
    SamplingParams(),
]


def test_penalties_and_bias_match_a_reference(device):
    """Greedy rows over many steps, where the penalties change which token wins; one row per setting, one batch."""
    vocab, steps = 24, 30
    base = torch.randn(len(PENALISED), vocab, generator=torch.Generator().manual_seed(9)) * 0.5
    base[:, :3] = torch.tensor([3.0, 2.6, 2.0])  # the same logits every step: only the penalties make it move
    prompts = [[0, 5], [1], [], [7], [3, 4], [1], [2]]
    sampler = Sampler(len(PENALISED) + 1, vocab, device)
    slots = list(range(len(PENALISED), 0, -1))  # not the row order
    for params, slot, prompt in zip(PENALISED, slots, prompts, strict=True):
        sampler.add(slot, params, prompt)
    generated: list[list[int]] = [[] for _ in PENALISED]
    for _ in range(steps):
        out = sampler(base.to(device), slots_of(slots, device))
        for i, (params, token) in enumerate(zip(PENALISED, out.token_ids, strict=True)):
            want = reference_scores(base[i].tolist(), prompts[i], generated[i], params)
            assert token == max(range(vocab), key=lambda t: (want[t], -t)), (i, generated[i])
            generated[i].append(token)
    assert all(g != [0] * steps for g in generated[:6]), "a penalty or bias never changed the greedy token"
    assert generated[6] == [0] * steps


def test_logit_bias_bans_forces_and_is_clamped(device):
    logits = torch.tensor([0.0, 150.0, 1.0, 2.0, 3.0])
    # +100 cannot beat a 150 lead (a bias of 1e6 is clamped to 100), +100 on a close token wins
    assert draw_many(logits, SamplingParams(logit_bias=((0, 1e6),)), 3, device).tolist() == [1, 1, 1]
    logits[1] = 4.0
    assert draw_many(logits, SamplingParams(logit_bias=((0, 100.0),)), 3, device).tolist() == [0, 0, 0]
    # -100 bans a token from sampling, over many seeds
    draws = draw_many(logits, SamplingParams(temperature=1.0, logit_bias=((1, -100.0), (4, -100.0))), 3000, device)
    assert not ((draws == 1) | (draws == 4)).any()
    assert set(draws.tolist()) == {0, 2, 3}


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax(device):
    vocab = 3000
    logits = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(4)) * 3).to(device)
    want = logits.log_softmax(-1)
    rows = [
        SamplingParams(logprobs=5),  # greedy
        SamplingParams(temperature=1.5, top_p=0.9, presence_penalty=1.0, logprobs=MAX_LOGPROBS, seed=1),
        SamplingParams(temperature=1.0, seed=2),  # did not ask
        SamplingParams(logprobs=0, repetition_penalty=2.0),
    ]
    sampler = Sampler(4, vocab, device)
    for slot, params in enumerate(rows):
        sampler.add(slot, params, [int(logits[slot].argmax())])
    out = sampler(logits, slots_of(range(4), device))
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(want[i, out.token_ids[i]]), abs=1e-6)
        assert len(lp.top) == rows[i].logprobs
        top = want[i].topk(max(rows[i].logprobs, 1))
        assert [t for t, _ in lp.top] == top.indices.tolist()[: rows[i].logprobs]
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist()[: rows[i].logprobs], abs=1e-6)
    # the greedy token carries the highest logprob
    assert out.token_ids[0] == out.logprobs[0].top[0][0]
    assert out.logprobs[0].logprob == max(v for _, v in out.logprobs[0].top)
    # the raw distribution, before the repetition penalty moved the greedy pick away from the argmax
    assert out.token_ids[3] != int(logits[3].argmax())
    assert out.logprobs[3].logprob < float(want[3].max())


# ---- one host transfer per call ------------------------------------------------------------------


# Ops that make the host wait for the device (a read of a value, or an output sized by data).
_SYNCING = {"aten.item", "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
            "aten.equal", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.allclose"}


def _reads_device_data(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _SYNCING:
        return True
    if name == "aten.index":  # a boolean mask index is a nonzero() inside
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if name == "aten._to_copy":
        return args[0].device.type != "cpu" and str(kwargs.get("device", args[0].device)) == "cpu"
    if name == "aten.copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _Transfers(TorchDispatchMode):
    """Records every read of device data: tolist() calls, and ops that make the host wait."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.in_tolist = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        name = str(func.overloadpacket)
        if not self.in_tolist and _reads_device_data(name, args, kwargs or {}):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_transfers(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Transfers]:
    mode = _Transfers()
    real = torch.Tensor.tolist

    def tolist(self: torch.Tensor):  # noqa: ANN202
        mode.reads.append("tolist")
        mode.in_tolist = True
        try:
            return real(self)
        finally:
            mode.in_tolist = False

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with mode:
        yield mode
    monkeypatch.setattr(torch.Tensor, "tolist", real)


def test_the_transfer_counter_catches_syncs(monkeypatch):
    x = torch.arange(6.0)
    for read in (lambda: x[0].item(), lambda: bool(x[1] > 0), lambda: x[x > 2], lambda: x.tolist(),
                 lambda: torch.nonzero(x), lambda: int(x.sum())):
        with count_transfers(monkeypatch) as seen:
            read()
        assert len(seen.reads) == 1, seen.reads


def test_one_host_transfer_per_call(device, monkeypatch):
    vocab = 4000
    sampler = Sampler(8, vocab, device)
    rows = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
            SamplingParams(temperature=1.0, top_k=30, frequency_penalty=0.5, logit_bias=((5, 1.0),)),
            SamplingParams(temperature=1.0, logprobs=4, repetition_penalty=1.2)]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)).to(device)
    for slot, params in enumerate(rows):
        sampler.add(slot * 2, params, [1, 2, 3])
    slots = slots_of([0, 2, 4, 6], device)
    for sizes in ([0, 1, 2, 3], [1], [0]):
        with count_transfers(monkeypatch) as seen:
            out = sampler(logits[sizes], slots[sizes])
        assert seen.reads == ["tolist"]
        assert len(out.token_ids) == len(sizes) and all(isinstance(t, int) for t in out.token_ids)


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "message"), [
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_k=-2), "top_k"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    (SamplingParams(logit_bias=((100, 1.0),)), "logit_bias"),
    (SamplingParams(logit_bias=((-1, 1.0),)), "logit_bias"),
    (SamplingParams(logprobs=MAX_LOGPROBS + 1), "logprobs"),
])
def test_bad_parameters_are_refused(params, message):
    sampler = Sampler(2, 100, "cpu")
    with pytest.raises(ValueError, match=message):
        sampler.add(0, params, [1])
    sampler.add(0, SamplingParams(), [1])  # the refused row took nothing


def test_rows_are_checked():
    sampler = Sampler(2, 100, "cpu")
    sampler.add(1, SamplingParams(), [])
    with pytest.raises(ValueError, match="taken"):
        sampler.add(1, SamplingParams(), [])
    with pytest.raises(ValueError, match="outside"):
        sampler.add(2, SamplingParams(), [])
    with pytest.raises(ValueError, match="holds no request"):
        sampler.remove(0)
    with pytest.raises(ValueError, match="prompt token ids"):
        sampler.add(0, SamplingParams(repetition_penalty=1.2), [100])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_synchronisation_per_call_on_cuda():
    """CUDA's own sync detector: the call waits for the device once (the fetch of its results)."""
    device = torch.device("cuda")
    sampler = Sampler(8, 4000, device)
    for slot, params in enumerate([SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, logprobs=3),
                                   SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5,
                                                  logit_bias=((4, 2.0),))]):
        sampler.add(slot, params, [1, 2])
    logits, slots = torch.randn(3, 4000, device=device), slots_of([0, 1, 2], device)
    sampler(logits, slots)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as caught:
            sampler(logits, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1, [str(w.message) for w in caught]
