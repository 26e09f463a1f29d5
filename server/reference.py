"""The plain reference forward: a transformers forward with the interventions applied by hooks.

Beside `interventions.reference_apply` (pyreft's formulas, transcribed), this is pyvene's way of
applying them: a forward hook on each intervened decoder layer rewrites its output at the
adapter's prompt positions. Training runs its forwards through it, so what is trained is what
the engine computes; `plain_logits` is the reference the engine is checked against (no KV cache,
no packing, no batched form), in tests and by the load test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from server.interventions import Intervention, reference_apply
from server.positions import Positions

if TYPE_CHECKING:
    from server.adapter_file import Adapter
    from server.model import BaseModel


@contextmanager
def hooked(
    layers: nn.ModuleList, interventions: Sequence[Intervention], where: Sequence[tuple[Tensor, Tensor]]
) -> Iterator[None]:
    """Apply `interventions[i]` after its layer at the (row, position) pairs `where[i]`.

    Several interventions on one layer apply in order, each reading what the previous wrote.
    """

    def hook_for(items: list[int]) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: Tensor | tuple) -> Tensor | tuple:
            h = output[0] if isinstance(output, tuple) else output
            for i in items:
                rows, cols = where[i]
                new = reference_apply(interventions[i], h[rows, cols].float()).to(h.dtype)
                h = h.index_put((rows, cols), new)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    by_layer: dict[int, list[int]] = {}
    for i, iv in enumerate(interventions):
        by_layer.setdefault(iv.layer, []).append(i)
    handles = [layers[layer].register_forward_hook(hook_for(items)) for layer, items in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def locations_index(
    prompt_lengths: Sequence[int], positions: Positions, count: int, share_weights: bool, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Per intervention, the (row, position) index tensors it acts on across a batch."""
    pairs: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    for row, length in enumerate(prompt_lengths):
        for i, locs in enumerate(positions.locations(length, count, share_weights)):
            pairs[i].extend((row, p) for p in locs)
    return [
        (torch.tensor([r for r, _ in p], dtype=torch.long, device=device),
         torch.tensor([c for _, c in p], dtype=torch.long, device=device))
        for p in pairs
    ]


@torch.inference_mode()
def plain_logits(base: BaseModel, ids: Sequence[int], prompt_length: int, adapter: Adapter | None) -> Tensor:
    """[len(ids), V] float32 logits of one plain forward, the adapter's interventions applied by hooks at its
    positions in the first `prompt_length` tokens."""
    ivs = adapter.interventions if adapter else ()
    where = locations_index([prompt_length], adapter.positions, len(ivs), adapter.share_weights,
                            base.device) if adapter else []
    with hooked(base.layers, ivs, where):
        out = base.model(input_ids=torch.tensor([list(ids)], device=base.device), use_cache=False)
    return out.logits[0].float()
