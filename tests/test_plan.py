"""The batch plan against a plain per-example reference, on a fake stack of layers (no model).

The batched side runs the runner's own hook: each fake layer is a module with
`server.engine.runner._intervene` installed as `ModelRunner` installs it, and the plan reaches it
through the forward's keyword arguments. Per layer, per round, the hook gathers the planned pairs
from the flattened [B * T, d] hidden states, applies `batched_apply` in float32 and writes the
result back in the hidden states' dtype. The reference side takes every row on its own, without
padding, and applies each intervention of its adapter, in adapter order, with `reference_apply`
(pyreft's formulas) at the positions given by the contract's rules, which this file transcribes
itself rather than calling `Positions.locations`.

The fake layers are element-wise and built only from correctly rounded operations (a leaky
ReLU of an affine map), so what happens at one position never depends on the batch, the
padding or the other rows: untouched positions must match the reference bit for bit,
intervened ones to float32 rounding (the hook's precision).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from bench.common import random_adapter
from server.adapter_file import Adapter, build
from server.engine.adapter_cache import AdapterRef, DeviceAdapterCache
from server.engine.plan import PlanRow, build_plan
from server.engine.runner import PLAN_KWARG, _intervene
from server.interventions import INTERVENTION_TYPES, Intervention, reference_apply
from server.model import ModelShape

D = 16
N_LAYERS = 4
SHAPE = ModelShape("llama", D, N_LAYERS)
CPU = torch.device("cpu")


# ---- the contract's position rules, transcribed ------------------------------------------------


def parse_counts(positions: str) -> tuple[int, int]:
    first = last = 0
    for part in positions.split("+"):
        if part.startswith("f"):
            first = int(part[1:])
        else:
            last = int(part[1:])
    return first, last


def contract_positions(positions: str, share_weights: bool, length: int, n: int) -> list[list[int]]:
    """First N / last N prompt tokens, each count capped at length // 2; with f+l unshared, the
    first half of the interventions gets the prefix and the second half the suffix (as pyreft,
    which shares the full list whenever one side is empty after capping)."""
    first, last = parse_counts(positions)
    first, last = min(first, length // 2), min(last, length // 2)
    prefix = list(range(first))
    suffix = list(range(length - last, length))
    if share_weights or first == 0 or last == 0:
        return [prefix + suffix for _ in range(n)]
    return [prefix for _ in range(n // 2)] + [suffix for _ in range(n // 2)]


# ---- the fake stack: element-wise layers with the runner's hook -----------------------------------


def layer_scales(seed: int = 1234) -> list[torch.Tensor]:
    """Per layer a [2, d] tensor: the scale and shift of its affine map."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, D, generator=gen, dtype=torch.float64) for _ in range(N_LAYERS)]


def fake_layer(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    y = x * params[0] + params[1]
    return torch.maximum(y, y * 0.25)


class FakeLayer(torch.nn.Module):
    """`fake_layer` as a decoder layer, with the runner's intervention hook installed as ModelRunner does."""

    def __init__(self, index: int, params: torch.Tensor) -> None:
        super().__init__()
        self.params = params
        self.register_forward_hook(_intervene(index), with_kwargs=True)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return fake_layer(x, self.params)


def as_dtype(iv: Intervention, dtype: torch.dtype) -> Intervention:
    return Intervention(iv.type, iv.layer, iv.rank, {k: v.to(dtype) for k, v in iv.tensors.items()})


@dataclass
class Row:
    adapter: Adapter | None
    hidden: torch.Tensor  # [L, d], the row's input to layer 0, unpadded


def reference_row(row: Row, scales: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, set[int]]:
    """The row alone: each layer, then each of its interventions on that layer, in adapter order."""
    h = row.hidden.clone()
    touched: set[int] = set()
    ivs = [] if row.adapter is None else [as_dtype(iv, dtype) for iv in row.adapter.interventions]
    if row.adapter is not None:
        locations = contract_positions(
            str(row.adapter.positions), row.adapter.share_weights, h.shape[0], len(ivs)
        )
    for layer in range(N_LAYERS):
        h = fake_layer(h, scales[layer])
        for i, iv in enumerate(ivs):
            if iv.layer != layer:
                continue
            for p in locations[i]:
                h[p] = reference_apply(iv, h[p])
                touched.add(p)
    return h, touched


def batched_rows(
    rows: list[Row], scales: list[torch.Tensor], dtype: torch.dtype, use_plan: bool = True, garbage_seed: int = 7
):
    """The rows left-padded into one [B, T, d] batch run through the fake stack with the plan."""
    width = max(r.hidden.shape[0] for r in rows)
    gen = torch.Generator().manual_seed(garbage_seed)
    # Padding slots hold garbage: nothing may read or write them.
    hidden = torch.randn(len(rows), width, D, generator=gen, dtype=torch.float64).to(dtype) * 100
    cache = DeviceAdapterCache(CPU, torch.float32, 1 << 30, set())  # as build_engine: forms in float32
    plan_rows = []
    for i, row in enumerate(rows):
        length = row.hidden.shape[0]
        pad = width - length
        hidden[i, pad:] = row.hidden
        if row.adapter is None:
            plan_rows.append(PlanRow(None, None, length, i * width + pad))
        else:
            resident = cache.get(AdapterRef(f"a{id(row.adapter)}", 1, row.adapter))
            plan_rows.append(PlanRow(resident.adapter, resident.forms, length, i * width + pad))
    plan = build_plan(plan_rows, CPU) if use_plan else None
    for layer in [FakeLayer(i, params) for i, params in enumerate(scales)]:
        hidden = layer(hidden, **{PLAN_KWARG: plan})
    return hidden, plan


def random_hidden(length: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(length, D, generator=gen, dtype=torch.float64).to(dtype)


def check_batch(rows: list[Row], dtype: torch.dtype = torch.float64, atol: float = 1e-5) -> None:
    scales = [s.to(dtype) for s in layer_scales()]
    out, plan = batched_rows(rows, scales, dtype)
    plain, _ = batched_rows(rows, scales, dtype, use_plan=False)
    width = out.shape[1]
    expected_pairs = 0
    for i, row in enumerate(rows):
        length = row.hidden.shape[0]
        pad = width - length
        ref, touched = reference_row(row, scales, dtype)
        got = out[i, pad:]
        if row.adapter is not None:
            locs = contract_positions(
                str(row.adapter.positions), row.adapter.share_weights, length, len(row.adapter.interventions)
            )
            expected_pairs += sum(len(p) for p in locs)
        for p in range(length):
            if p in touched:
                torch.testing.assert_close(got[p], ref[p], atol=atol, rtol=0, msg=f"row {i} position {p}")
            else:
                # Never intervened on: the same bits as the reference and as a run without a plan.
                assert torch.equal(got[p], ref[p]), f"row {i} position {p} changed though never intervened on"
        # The padding garbage is untouched, and rows without an adapter are bit-identical to no plan.
        assert torch.equal(out[i, :pad], plain[i, :pad]), f"row {i}: padding was written"
        if row.adapter is None or not touched:
            assert torch.equal(out[i], plain[i]), f"row {i} without intervened positions changed"
    if expected_pairs == 0:
        assert plan is None
    else:
        assert plan is not None and plan.pairs == expected_pairs


# ---- the tests -----------------------------------------------------------------------------------


def test_contract_positions_transcription_sanity():
    assert contract_positions("f2+l2", True, 16, 2) == [[0, 1, 14, 15]] * 2
    assert contract_positions("f3+l3", False, 10, 2) == [[0, 1, 2], [7, 8, 9]]
    assert contract_positions("f3+l3", False, 3, 4) == [[0], [0], [2], [2]]
    assert contract_positions("f3+l3", False, 1, 2) == [[], []]
    assert contract_positions("l5", False, 4, 3) == [[2, 3]] * 3
    assert contract_positions("f5", True, 7, 1) == [[0, 1, 2]]


def test_all_six_types_mixed_in_one_batch():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for j, kind in enumerate(INTERVENTION_TYPES):
        adapter = random_adapter(SHAPE, [(kind, j % N_LAYERS, 1 + j)], ["f2+l2", "f3", "l4", "f1+l3"][j % 4], True,
                                 seed=j, proj_bias=(kind == "noreft"))
        rows.append(Row(adapter, random_hidden(5 + 3 * j, gen, torch.float64)))
        if j % 2:
            rows.append(Row(None, random_hidden(4 + j, gen, torch.float64)))
    # One row carrying every type at once, on the same layer and on others.
    every = random_adapter(SHAPE, [(k, (i * 3) % N_LAYERS, 1 + i % 4) for i, k in enumerate(INTERVENTION_TYPES)],
                         "f2+l2", True, seed=99, proj_bias=True)
    rows.append(Row(every, random_hidden(9, gen, torch.float64)))
    check_batch(rows)


def test_same_layer_interventions_apply_in_adapter_order_on_overlapping_positions():
    gen = torch.Generator().manual_seed(1)
    # Three interventions on layer 1 (all share every position), one on layer 2, one more on layer 1 last.
    specs = [("loreft", 1, 3), ("direft", 1, 2), ("noreft", 1, 4), ("consreft", 2, 2), ("nodireft", 1, 1)]
    adapter = random_adapter(SHAPE, specs, "f3+l2", True, seed=5, proj_bias=True)
    other = random_adapter(SHAPE, [("lobireft", 1, 2), ("loreft", 1, 5)], "l3", True, seed=6)
    rows = [Row(adapter, random_hidden(n, gen, torch.float64)) for n in (12, 5, 3, 2)]
    rows += [Row(other, random_hidden(7, gen, torch.float64)), Row(None, random_hidden(10, gen, torch.float64))]
    check_batch(rows)

    # The order matters: the same interventions in another order give different numbers, and
    # the plan follows the adapter's order, not some canonical one.
    swapped = build(list(reversed(adapter.interventions)), adapter.positions, True, SHAPE, "float32")
    scales = layer_scales()
    h = random_hidden(12, gen, torch.float64)
    a, _ = reference_row(Row(adapter, h), scales, torch.float64)
    b, _ = reference_row(Row(swapped, h), scales, torch.float64)
    assert not torch.allclose(a, b)
    check_batch([Row(swapped, h), Row(adapter, h)])


def test_unshared_first_and_last_split_the_interventions():
    gen = torch.Generator().manual_seed(2)
    # Unshared f+l: the first half (ivs 0, 1) gets the prefix, the second half (ivs 2, 3) the suffix.
    # iv 0 and iv 2 share layer 1, iv 1 and iv 3 share layer 3.
    adapter = random_adapter(SHAPE, [("loreft", 1, 4), ("noreft", 3, 2), ("direft", 1, 3), ("loreft", 3, 1)],
                           "f3+l2", False, seed=11)
    assert [iv.layer for iv in adapter.interventions] == [1, 3, 1, 3]
    shared = build(list(adapter.interventions), adapter.positions, True, SHAPE, "float32")
    rows = [Row(adapter, random_hidden(n, gen, torch.float64)) for n in (20, 6, 5, 4, 3, 2, 1)]
    rows += [Row(shared, random_hidden(9, gen, torch.float64)), Row(None, random_hidden(3, gen, torch.float64))]
    check_batch(rows)

    # The split really happens: iv 0 (prefix) never touches the suffix, and unshared differs from shared.
    h = random_hidden(10, gen, torch.float64)
    scales = layer_scales()
    unshared_out, unshared_touched = reference_row(Row(adapter, h), scales, torch.float64)
    shared_out, _ = reference_row(Row(shared, h), scales, torch.float64)
    assert unshared_touched == {0, 1, 2, 8, 9}
    assert not torch.allclose(unshared_out, shared_out)


@pytest.mark.parametrize("share_weights", [True, False])
def test_prompts_shorter_than_both_counts_are_capped(share_weights):
    gen = torch.Generator().manual_seed(3)
    adapter = random_adapter(SHAPE, [("loreft", 0, 2), ("consreft", 2, 3)], "f3+l3", share_weights, seed=21)
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    rows = [Row(adapter, random_hidden(n, gen, torch.float64)) for n in lengths]
    check_batch(rows)
    # length 1 caps both counts to 0: no position at all, the row is untouched.
    _, touched = reference_row(rows[0], layer_scales(), torch.float64)
    assert touched == set()


def test_only_rows_without_positions_give_no_plan():
    gen = torch.Generator().manual_seed(4)
    adapter = random_adapter(SHAPE, [("loreft", 0, 2)], "f3+l3", True, seed=22)
    rows = [Row(adapter, random_hidden(1, gen, torch.float64)), Row(None, random_hidden(5, gen, torch.float64))]
    check_batch(rows)  # asserts the plan is None
    single = random_adapter(SHAPE, [("loreft", 0, 2)], "l1", True, seed=22)
    rows = [Row(single, random_hidden(1, gen, torch.float64))]
    check_batch(rows)  # l1 on length 1: 1 // 2 == 0, nothing


def test_rows_without_adapter_are_untouched_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    adapter = random_adapter(SHAPE, [("loreft", 0, 4), ("noreft", 0, 4), ("direft", 3, 2)], "f4+l4", True, seed=23)
    rows = []
    for n in (30, 1, 17, 2, 8):
        rows.append(Row(None, random_hidden(n, gen, torch.float64)))
        rows.append(Row(adapter, random_hidden(n + 3, gen, torch.float64)))
    check_batch(rows)
    # also in float32, the engine's CPU dtype
    rows32 = [Row(r.adapter, r.hidden.float()) for r in rows]
    check_batch(rows32, dtype=torch.float32, atol=1e-4)


def test_different_ranks_in_one_round():
    gen = torch.Generator().manual_seed(6)
    adapters = [random_adapter(SHAPE, [(kind, 2, rank)], "f2+l2", True, seed=30 + rank)
                for kind, rank in [("loreft", 1), ("noreft", 8), ("direft", 3), ("consreft", 5), ("nodireft", 2)]]
    rows = [Row(a, random_hidden(6 + i, gen, torch.float64)) for i, a in enumerate(adapters)]
    _, plan = batched_rows(rows, layer_scales(), torch.float64)
    assert plan is not None and list(plan.rounds) == [2] and len(plan.rounds[2]) == 1
    assert plan.rounds[2][0].stacked.A.shape == (5, 8, D)  # padded to the round's largest rank
    check_batch(rows)


def test_one_adapter_in_many_rows_and_the_same_position_in_different_rounds():
    gen = torch.Generator().manual_seed(7)
    adapter = random_adapter(SHAPE, [("loreft", 1, 2), ("loreft", 1, 2), ("loreft", 1, 2)], "f1+l1", True, seed=40)
    rows = [Row(adapter, random_hidden(n, gen, torch.float64)) for n in (2, 3, 9, 9)]
    _, plan = batched_rows(rows, layer_scales(), torch.float64)
    assert plan is not None and len(plan.rounds[1]) == 3
    check_batch(rows)


POOL_SPECS = [
    ([("loreft", 0, 4), ("loreft", 2, 4)], "f2+l2", True),
    ([("noreft", 1, 3), ("noreft", 1, 2), ("direft", 3, 5), ("consreft", 1, 1)], "f3+l3", False),
    ([("lobireft", 0, 2)], "l3", True),
    ([("nodireft", 3, 6), ("direft", 3, 2)], "f4", False),
    ([("consreft", 2, 8), ("loreft", 2, 1), ("noreft", 0, 4)], "f1+l5", True),
    ([("direft", 0, 3), ("lobireft", 0, 3)], "f2+l1", False),
]


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_match_per_example_reference(seed):
    rng = random.Random(seed)
    pool = [random_adapter(SHAPE, s, p, sh, seed=100 + i, proj_bias=bool(i % 2))
            for i, (s, p, sh) in enumerate(POOL_SPECS)]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(rng.randint(1, 9)):
        adapter = rng.choice(pool + [None, None])
        length = rng.choice([1, 2, 3, rng.randint(1, 12), rng.randint(1, 40)])
        rows.append(Row(adapter, random_hidden(length, gen, torch.float64)))
    check_batch(rows)


def test_bfloat16_hidden_states_are_intervened_in_float32():
    """A bfloat16 model with float32 forms (as build_engine makes them): each round reads its positions
    in float32 and writes back in bfloat16, so the result is the float64 reference rounded at the
    same points, to one bfloat16 step; without the hook's upcast the mixed dtypes do not even run."""
    gen = torch.Generator().manual_seed(8)
    adapter = random_adapter(SHAPE, [("loreft", N_LAYERS - 1, 4), ("noreft", N_LAYERS - 1, 2)], "f2+l2", True, seed=50)
    rows = [Row(adapter, random_hidden(n, gen, torch.bfloat16)) for n in (9, 4)]
    rows.append(Row(None, random_hidden(6, gen, torch.bfloat16)))
    scales = [s.to(torch.bfloat16) for s in layer_scales()]
    out, plan = batched_rows(rows, scales, torch.bfloat16)
    plain, _ = batched_rows(rows, scales, torch.bfloat16, use_plan=False)
    assert out.dtype == torch.bfloat16 and plan is not None
    width = out.shape[1]
    for i, row in enumerate(rows):
        pad = width - row.hidden.shape[0]
        if row.adapter is None:
            assert torch.equal(out[i], plain[i])
            continue
        # The last layer's interventions see what the plain run computed; each applies to the previous one's result.
        want = plain[i, pad:].double()
        for iv in row.adapter.interventions:
            for p in contract_positions(str(row.adapter.positions), True, row.hidden.shape[0], 1)[0]:
                want[p] = reference_apply(as_dtype(iv, torch.float64), want[p].to(torch.bfloat16).double())
        torch.testing.assert_close(out[i, pad:].double(), want.to(torch.bfloat16).double(), rtol=2**-8, atol=1e-6)
