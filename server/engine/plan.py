"""The batch plan: for one prefill, which (row, position) pairs each layer changes, and with what.

A plan is built once per prefill step from the rows' adapters, prompt lengths and the part of the
prompt each row computes in this step (a chunk), before the forward pass. First-N / last-N
positions are absolute prompt positions, known up front, so a chunk carries exactly the
planned positions that fall inside it. Per intervened layer it holds ordered rounds; round k
applies the k-th intervention that each adapter places on that layer, so several interventions
of one adapter on one layer act one after another, as pyvene's hooks do. Each round is one
gather + two batched matmuls over all pairs of all rows (`interventions.batched_apply`): no loop
over requests in the forward. Rows without an adapter contribute no pairs and cost nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.adapter_file import ServedAdapter
from server.interventions import CommonForm, StackedForms


@dataclass(frozen=True)
class PlanRow:
    """One prefill row: its adapter (None = base model), its device-resident forms, where its tokens sit.

    The row computes prompt positions [start, start + length) (the whole prompt unless chunked);
    position `start` sits at index `offset` of the step's flattened hidden states.
    """

    adapter: ServedAdapter | None
    forms: Sequence[CommonForm] | None  # one per intervention, in adapter order, on the device
    prompt_length: int
    offset: int
    start: int = 0
    length: int | None = None  # None = up to the end of the prompt

    @property
    def end(self) -> int:
        return self.prompt_length if self.length is None else self.start + self.length


@dataclass(frozen=True)
class Round:
    flat_index: Tensor  # [N] positions in the flattened [batch * seq] hidden states
    slots: Tensor  # [N] which stacked intervention acts on each pair
    stacked: StackedForms


@dataclass(frozen=True)
class BatchPlan:
    rounds: dict[int, list[Round]]  # decoder layer -> rounds, applied in order

    @property
    def pairs(self) -> int:
        return sum(int(r.flat_index.numel()) for rounds in self.rounds.values() for r in rounds)


def build_plan(rows: Sequence[PlanRow], device: torch.device) -> BatchPlan | None:
    """Map every (row, position) an adapter touches to its intervention slot; None if no row has one."""
    # (layer, round) -> (flat indices, slot per pair, forms by slot)
    flat: dict[tuple[int, int], list[int]] = defaultdict(list)
    slots: dict[tuple[int, int], list[int]] = defaultdict(list)
    forms: dict[tuple[int, int], list[CommonForm]] = defaultdict(list)
    for row in rows:
        if row.adapter is None or row.forms is None:
            continue
        seen_on_layer: dict[int, int] = defaultdict(int)
        locations = row.adapter.locations(row.prompt_length)
        base = row.offset - row.start
        for iv, form, positions in zip(row.adapter.interventions, row.forms, locations, strict=True):
            key = (iv.layer, seen_on_layer[iv.layer])
            seen_on_layer[iv.layer] += 1
            inside = [p for p in positions if row.start <= p < row.end]
            if not inside:
                continue
            slot = len(forms[key])
            forms[key].append(form)
            flat[key].extend(base + p for p in inside)
            slots[key].extend([slot] * len(inside))
    if not flat:
        return None
    rounds: dict[int, list[Round]] = defaultdict(list)
    for layer, k in sorted(flat):
        key = (layer, k)
        rank = max(f.A.shape[0] for f in forms[key])
        stacked = StackedForms.stack([f.padded(rank) for f in forms[key]])
        rounds[layer].append(
            Round(
                flat_index=torch.tensor(flat[key], dtype=torch.long, device=device),
                slots=torch.tensor(slots[key], dtype=torch.long, device=device),
                stacked=stacked,
            )
        )
    return BatchPlan(dict(rounds))

