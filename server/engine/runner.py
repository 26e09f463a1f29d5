"""The model runner: prefill and decode steps on the frozen base model, and the KV cache they share.

Hooks on every decoder layer are installed once, at start-up. During a prefill they read the
current `BatchPlan` and change only the planned (row, position) pairs in place; during decode
the plan is None and each hook returns at once, so decode costs what the base model costs.

The running batch's KV cache is a transformers DynamicCache of left-padded rows. New rows are
prefilled together, then merged into the running batch (padding the shorter side on the left);
finished rows are dropped by index and fully padded leading columns trimmed away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from server.engine.adapter_cache import ResidentAdapter
from server.engine.plan import BatchPlan, PlanRow, build_plan
from server.interventions import batched_apply
from server.model import BaseModel


@dataclass
class KVBatch:
    """KV cache and attention mask of the rows being decoded, in row order."""

    cache: DynamicCache
    mask: Tensor  # [B, T] 1 = real token, 0 = left padding
    lengths: Tensor  # [B] real tokens per row = next position id

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and cut padding columns no remaining row needs."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        start = int(self.mask.shape[1] - self.lengths.max().item()) if len(rows) else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = self.mask[:, start:]

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever side is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.lengths = torch.cat([self.lengths, other.lengths])


def _left_pad(x: Tensor, width: int) -> Tensor:
    """Zero-pad the sequence axis (dim 2 of a [B, H, T, D] cache, dim 1 of a [B, T] mask) on the left."""
    seq_dim = 2 if x.dim() == 4 else 1
    missing = width - x.shape[seq_dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[seq_dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=seq_dim)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Hand the LM head a contiguous input, so that it runs as one matrix product.

    For the prefill, transformers slices the last position out of the hidden states; that
    [B, 1, d] view is not contiguous, and matmul then runs it as a batched product over B
    expanded copies of the head's weight. With the default model at B = 32 that took 145 ms
    of the prefill where the same product as one mm takes about 28 ms.
    """
    return (args[0].contiguous(), *args[1:])


class ModelRunner:
    """Runs the base model's forward passes; the only place that touches the model."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model = base.model
        self.device = base.device
        gen = base.model.generation_config
        self.pad_id = int(gen.pad_token_id if gen.pad_token_id is not None else 0)
        self._plan: BatchPlan | None = None
        for index, layer in enumerate(base.layers):
            layer.register_forward_hook(self._hook(index))
        head = base.model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)

    def _hook(self, layer_index: int):  # noqa: ANN202 - torch hook signature
        def intervene(module: torch.nn.Module, args: tuple, output: Tensor | tuple) -> None:
            plan = self._plan
            if plan is None or layer_index not in plan.rounds:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if not hidden.is_contiguous():
                raise RuntimeError("decoder layer returned a non-contiguous hidden state; cannot intervene in place")
            flat = hidden.view(-1, hidden.shape[-1])
            for step in plan.rounds[layer_index]:
                x = flat.index_select(0, step.flat_index)
                flat.index_copy_(0, step.flat_index, batched_apply(x, step.stacked, step.slots))
            return None

        return intervene

    @torch.inference_mode()
    def prefill(
        self, prompts: Sequence[Sequence[int]], rows: Sequence[ResidentAdapter | None]
    ) -> tuple[Tensor, KVBatch, int]:
        """Run the prompts as one left-padded batch with their interventions.

        Returns the last-position logits [B, V], the new rows' KV batch and the number of
        (row, position) pairs intervened on.
        """
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        plan_rows = []
        for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            pad = width - len(prompt)
            ids[i, pad:] = torch.tensor(prompt, dtype=torch.long)
            mask[i, pad:] = 1
            adapter, forms = (row.adapter, row.forms) if row is not None else (None, None)
            plan_rows.append(PlanRow(adapter, forms, len(prompt), pad))
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        plan = build_plan(plan_rows, width, self.device)
        cache = DynamicCache()
        self._plan = plan
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1,
            )
        finally:
            self._plan = None
        lengths = mask.sum(-1)
        return out.logits[:, -1, :].float(), KVBatch(cache, mask, lengths), (plan.pairs if plan else 0)

    @torch.inference_mode()
    def decode(self, batch: KVBatch, tokens: Tensor) -> Tensor:
        """One decode step for every row: feed each row's last token, return next-token logits [B, V]."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        out = self.model(
            input_ids=tokens.view(-1, 1).to(self.device), attention_mask=batch.mask,
            position_ids=batch.lengths.view(-1, 1), past_key_values=batch.cache, use_cache=True,
        )
        batch.lengths = batch.lengths + 1
        return out.logits[:, -1, :].float()
