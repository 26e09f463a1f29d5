"""The model runner: prefill and decode forwards on the frozen base model, over the engine's KV cache.

Every forward is one packed sequence `[1, N]`: the rows' tokens one after another, each with
its own position ids and its own KV columns (`kv_cache.py`), so no token is padding and no row
waits for the longest. What a forward needs beyond the model's own inputs travels with the call:
the `AttentionLayout` (which columns each row's queries read) and, in a prefill, the `BatchPlan`
(which positions each layer's interventions change). Nothing is left in a field between calls.

One function applies a plan to a layer's output (`intervene`): the lean forward calls it after each
layer of a prefill, and for a forward through transformers' modules, hooks installed once on every
decoder layer read the plan from the layer's keyword arguments. Decode forwards have no plan, so
they cost what the base model costs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine import attention
from server.engine.adapter_cache import ResidentAdapter
from server.engine.attention_kernel import ENTRY_POINTS, DecodeKernel, RowColumns
from server.engine.compiled import CompiledDecode, CompiledLoneRow
from server.engine.kv_cache import KVCache, Slot, StepCache
from server.engine.lean_decode import LeanDecode, supports
from server.engine.lone_row import NativeLoneRow
from server.engine.panel_product import PanelLibrary
from server.engine.plan import BatchPlan, PlanRow, build_plan
from server.interventions import batched_apply
from server.model import BaseModel

PLAN_KWARG = "reft_plan"


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + len(tokens)) of one row, computed in one prefill step."""

    tokens: Sequence[int]
    start: int
    prompt_length: int
    slot: Slot
    adapter: ResidentAdapter | None = None
    prompt_logits: bool = False  # also return the logits at positions whose next token is a prompt token (echo)

    @property
    def completes_prompt(self) -> bool:
        return self.start + len(self.tokens) == self.prompt_length

    @property
    def predicting_prompt(self) -> int:
        """How many of the chunk's positions predict a prompt token (all but the prompt's last)."""
        return min(len(self.tokens), self.prompt_length - 1 - self.start)


@dataclass(frozen=True)
class DecodeRow:
    token: int  # the row's last sampled token, fed at `position`
    position: int
    slot: Slot


@dataclass(frozen=True)
class PrefillResult:
    logits: Tensor  # [rows whose prompt this step completed, V], in chunk order
    intervened: int  # (row, layer-round, position) pairs changed
    prompt_logits: list[Tensor | None]  # per chunk: [predicting_prompt, V] where it asked, else None


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Hand the LM head a contiguous input, so that it runs as one matrix product.

    transformers slices the kept positions out of the hidden states; a strided view there makes
    matmul run a batched product over expanded copies of the head's weight (145 ms against 28 ms
    as one mm at 32 rows with the default model).
    """
    return (args[0].contiguous(), *args[1:])


class ModelRunner:
    """Runs the base model's forward passes; the only place that touches the model."""

    def __init__(self, base: BaseModel, cache: KVCache, *, compile_decode: bool = False, compile_single: bool = False,
                 native_single: bool = False, pack_weights: bool = False, panel_products: bool = False,
                 attention_kernel: bool = False, max_rows: int = 32) -> None:
        self.base = base
        self.model = base.model
        self.device = base.device
        self.cache = cache
        attention.install(self.model)
        for index, layer in enumerate(base.layers):
            layer.register_forward_hook(_intervene(index), with_kwargs=True)
        head = base.model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)
        # --compile: decode steps, which are many and alike, run through one captured graph (compiled.py);
        # prefill stays eager. Compiling happens in warm_up(), at start-up, not on the first request.
        self.compiled: CompiledDecode | None = None
        # Prefills and eager decode steps of a Llama-family model skip transformers' module code (lean_decode.py);
        # a compiled step traces transformers' forward, whose graph inductor fuses anyway.
        # Its packed weight copies, for steps of many rows, are the panel library's on a CPU in float32 where that
        # builds (panel_product.py), else oneDNN's.
        self.lean: LeanDecode | None = None
        if supports(self.model) and not compile_decode:
            panels = pack_weights and panel_products and self.device.type == "cpu" and base.dtype == torch.float32
            self.lean = LeanDecode(self.model, pack=pack_weights, panels=PanelLibrary.build() if panels else None)
        if compile_decode:
            self.compiled = CompiledDecode(self._decode_forward, cache, max_rows, self.device)
        # Decode attention through a kernel built at start-up, on a CPU over float32 or bfloat16 pools
        # (attention_kernel.py); None where it was not asked for or could not be built: SDPA over grouped slots then.
        # A compiled decode step has its own attention (attention.indexed_decode), so it is not built for one.
        self.kernel: DecodeKernel | None = None
        if attention_kernel and not compile_decode and self.device.type == "cpu" and cache.dtype in ENTRY_POINTS:
            self.kernel = DecodeKernel.build(self.model.config.num_attention_heads // cache.kv_heads, cache.head_dim)
        # A lone row's step (one stream alone), on a CPU in float32: through a C++ library built at start-up
        # (lone_row.py), else through a compiled lean forward (compiled.py), each measured to pay there. Not in
        # bfloat16: the library computes in float32 only, and inductor keeps fused intermediates in float32 where
        # the eager step rounds each op, so the two steps' logits part by up to several units, more than a check
        # could tell from a wrong result, for 1.12x (measured on a Xeon with AMX).
        self.lone_row: NativeLoneRow | CompiledLoneRow | None = None
        lone_cpu = self.lean is not None and self.device.type == "cpu" and cache.dtype == torch.float32
        self.compile_single = compile_single and lone_cpu  # also where the native step fails its check (warm_up)
        if native_single and lone_cpu:
            self.lone_row = NativeLoneRow.build(self.lean, cache)
        if self.lone_row is None and self.compile_single:
            self.lone_row = CompiledLoneRow(self.lean, cache)

    def warm_up(self) -> None:
        """Check the native lone-row step, time the lean forward's product forms, then compile the decode steps (and
        on a GPU record their CUDA graphs), in the thread that will run them."""
        if isinstance(self.lone_row, NativeLoneRow) and not self.lone_row.warm_up():
            self.lone_row = CompiledLoneRow(self.lean, self.cache) if self.compile_single else None
        if self.lean is not None:
            self.lean.tune(traced_rows=1 if isinstance(self.lone_row, CompiledLoneRow) else 0)
        if self.compiled is not None:
            self.compiled.warm_up()
        if isinstance(self.lone_row, CompiledLoneRow) and not self.lone_row.warm_up():
            self.lone_row = None

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> PrefillResult:
        """Compute the chunks' prompt tokens with their interventions; logits for rows whose prompt ends here.

        The LM head runs only at the positions kept: each completing row's last one, and every position
        of a chunk that asked for prompt logits (at 49k vocabulary entries a position, the head over a
        whole prompt costs more than the rest of a small model's forward).
        """
        ids, positions, columns, spans, plan_rows, keep = [], [], [], [], [], []
        last: list[int] = []  # index into the kept rows of each completing row's next-token logits
        echoed: list[tuple[int, int] | None] = []  # per chunk: its prompt logits' (first kept row, count)
        for chunk in chunks:
            offset, n = len(ids), len(chunk.tokens)
            self.cache.writing(chunk.slot, chunk.start + n)
            ids.extend(chunk.tokens)
            positions.extend(range(chunk.start, chunk.start + n))
            columns.extend(range(chunk.slot.start + chunk.start, chunk.slot.start + chunk.start + n))
            spans.append((offset, n, chunk.slot.start, chunk.start))
            if chunk.adapter is not None:
                plan_rows.append(PlanRow(chunk.adapter.adapter, chunk.adapter.forms, chunk.prompt_length, offset,
                                         chunk.start, n))
            echoed.append((len(keep), chunk.predicting_prompt) if chunk.prompt_logits else None)
            if chunk.prompt_logits:
                keep.extend(range(offset, offset + n))
            if chunk.completes_prompt:
                if not chunk.prompt_logits:
                    keep.append(offset + n - 1)
                last.append(len(keep) - 1)
        plan = build_plan(plan_rows, self.device)
        logits = self._forward(ids, positions, columns, attention.prefill_layout(spans, self.device), plan, keep)
        prompt_logits = [None if e is None else logits[e[0] : e[0] + e[1]] for e in echoed]
        completing = logits if len(last) == len(keep) else logits[last]  # no copy unless a chunk asked for more
        return PrefillResult(completing, plan.pairs if plan else 0, prompt_logits)

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> Tensor:
        """One decode step for `rows`: feed each row's last token, return next-token logits [B, V]."""
        for r in rows:
            self.cache.writing(r.slot, r.position + 1)
        if self.compiled is not None:
            return self.compiled([(r.token, r.position, r.slot) for r in rows])
        if self.lone_row is not None and len(rows) == 1:
            return self.lone_row(rows[0].token, rows[0].position, rows[0].slot)
        layout: attention.Layout
        if self.kernel is not None:
            layout = attention.KernelDecode(self.kernel, RowColumns.of(
                [r.slot.start for r in rows], [r.position + 1 for r in rows], self.device))
        else:
            layout = attention.decode_layout([r.slot for r in rows], [r.position + 1 for r in rows],
                                             self.cache.block_tokens, self.device)
        if self.lean is not None:
            ids, positions = [r.token for r in rows], [r.position for r in rows]
            return self.lean(self.cache, self._tensor(ids), self._tensor(positions),
                             self._tensor([r.slot.start + r.position for r in rows]), layout)
        return self._forward([r.token for r in rows], [r.position for r in rows],
                             [r.slot.start + r.position for r in rows], layout, None, None)

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, device=self.device)

    def _forward(self, ids: list[int], positions: list[int], columns: list[int], layout: attention.Layout,
                 plan: BatchPlan | None, keep: list[int] | None) -> Tensor:
        device = self.device
        return self._model_step(
            torch.tensor([ids], device=device), torch.tensor([positions], device=device),
            torch.tensor(columns, device=device), layout, plan,
            torch.tensor(keep, dtype=torch.long, device=device) if keep is not None else 0,
        )

    def _decode_forward(self, ids: Tensor, positions: Tensor, columns: Tensor, index: attention.DecodeIndex) -> Tensor:
        """The compiled decode step's forward: every position's logits, no plan."""
        return self._model_step(ids, positions, columns, index, None, 0)

    def _model_step(self, ids: Tensor, positions: Tensor, columns: Tensor,
                    layout: attention.Layout, plan: BatchPlan | None, keep: Tensor | int) -> Tensor:
        if self.lean is not None:
            # Through the lean forward, its products fused and on packed weights as a decode step's, with the
            # interventions applied to each layer's output as the decoder layers' hooks would.
            edit = functools.partial(intervene, plan) if plan is not None else None
            hidden = self.lean.hidden(self.cache, ids[0], positions[0], columns, layout, edit)
            return self.lean.head(hidden if isinstance(keep, int) else hidden.index_select(0, keep)).float()
        inputs = dict(input_ids=ids, position_ids=positions, cache_position=columns,
                      past_key_values=StepCache(self.cache, columns), use_cache=True,
                      **{attention.LAYOUT_KWARG: layout}, **({PLAN_KWARG: plan} if plan is not None else {}))
        return self.model(**inputs, logits_to_keep=keep).logits[0].float()


def intervene(plan: BatchPlan, layer_index: int, hidden: Tensor) -> None:
    """Apply `plan`'s interventions after decoder layer `layer_index` to its output `hidden` [..., hidden], in place."""
    if layer_index not in plan.rounds:
        return
    if not hidden.is_contiguous():
        raise RuntimeError("decoder layer returned a non-contiguous hidden state; cannot intervene in place")
    flat = hidden.view(-1, hidden.shape[-1])
    for step in plan.rounds[layer_index]:
        # In float32 whatever the model's dtype (pyreft trains in float32), written back in the model's.
        x = flat.index_select(0, step.flat_index).float()
        flat.index_copy_(0, step.flat_index, batched_apply(x, step.stacked, step.slots).to(flat.dtype))


def _intervene(layer_index: int):  # noqa: ANN202 - torch hook signature
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> None:
        plan: BatchPlan | None = kwargs.get(PLAN_KWARG)
        if plan is not None:
            intervene(plan, layer_index, output[0] if isinstance(output, tuple) else output)

    return hook
