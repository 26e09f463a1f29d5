"""A Llama-family base model's steps in 36 torch calls a layer, not transformers' 61.

Why: at batch 1 the step computes little (one row against 135M weights), and eagerly through
transformers' modules a third of its time went to the framework between the matmuls: about 1,840
top-level torch calls a step with the default model (per layer: norms as five ops each, three q/k/v
and two gate/up products, rotary as slices, negations and concatenations for q and k apart, module
hooks, keyword plumbing). This forward computes the same functions with the same weights:

- q, k and v as one matrix product, gate and up as another: the modules' weights become row views
  of one fused tensor per layer (`fuse_projections`), so prefill, training and the reference
  forwards read the same memory and no weight is held twice;
- RMSNorm as `torch.rms_norm` (one fused op, float32 throughout like transformers' five; the step's
  logits came out equal to transformers' on the default model, tested to 1e-5); in bfloat16, as
  transformers rounds it: normalised in float32, rounded to bfloat16, then times the weight;
- rotary applied to q and k together, `rotate_half` as a flip of the two halves times a sine whose
  first half is negated (the same products and sum as transformers', bit for bit);
- attention through `attention.attention` with the runner's layout, as every other step;
- on a CPU, a product over a few rows as a batched product over row blocks of the weight
  (`split_linear`): the same dot products, on all of torch's threads; over more rows, the panel
  products of `panel_product.py` on their own packed copy of the weight, up to `PANEL_ROWS` rows, and
  oneDNN's matmul (`onednn_linear`), not MKL's, past them. Without the panel library, oneDNN's
  matmul from a few rows up, on its own packed copy (`packed_weight`). The runner can be told to keep
  no copy. Which form (F.linear, MKL's, too) is fastest at a few rows depends on the CPU, so the
  runner times them at start-up on the model's own weights and keeps the fastest per weight shape and
  row count (`LeanDecode.tune`).

Prefill steps run this forward too (`hidden`), with the runner's interventions applied to each layer's
output as the decoder layers' hooks would apply them: the same fused products on the packed copies, where
transformers' modules ran seven products a layer over the weights as they are (a 64-token prompt's prefill
in 0.67x the time on a 2-core Xeon). Interventions are prefill-only, so a decode step has none. Models this
does not fit (`supports` says which) run through transformers.

float32 everywhere; bfloat16 (`--dtype bfloat16`) on a CPU, where oneDNN runs its products on AMX or
avx512_bf16: each op is transformers' own in bfloat16, so the two forwards part by the products' summation
order only. bfloat16 on a GPU keeps transformers' forward (the lean one has never run on a GPU in bfloat16).
"""

from __future__ import annotations

import functools
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.engine import attention
from server.engine.kv_cache import KVCache, Slot
from server.engine.panel_product import PanelLibrary, PanelWeight

log = logging.getLogger(__name__)

# The untuned rule, which `LeanDecode.tune` keeps unless a form beats it by `TUNE_MARGIN` on the CPU it runs on:
# rows up to which `split_linear` beats oneDNN's product (bench/matvec.py on the 2-core AMD EPYC, torch 2.13),
# summed over the default model's weights, the LM head's included: over the weight as it is, 4 (at 8 rows oneDNN's
# is as fast or faster); over its packed copy, 2 (at 3 rows the packed products took 6% less time in all).
SPLIT_ROWS = 4
SPLIT_ROWS_PACKED = 2
# Rows up to which the panel products (`panel_product.py`) beat oneDNN's and MKL's, by the sum of the default model's
# products (bench/matvec.py, 2-core Xeon: 0.64-0.78x the time of oneDNN's over its packed copy at 2-32 rows, 0.85-0.92x
# at 64-128, 1.29x at 256). Past it, oneDNN's.
PANEL_ROWS = 128
PACK_HINT_ROWS = 16
# The same in bfloat16 (bench/matvec.py --dtype bfloat16 on a 2-core Xeon with AMX, torch 2.13), where oneDNN's
# products of a few rows cost 60-80 us each whatever the weight's size: over the weight as it is, split products
# took less time in all up to 32 rows (the most measured); over the packed copy, up to 2 (from 4, packed ones).
SPLIT_ROWS_BF16 = 32
SPLIT_ROWS_PACKED_BF16 = 2
# `LeanDecode.tune` times each form at these row counts; a step of n rows takes the choice made at the first >= n.
# Past the last, the rule above holds (many rows: the panel products, or oneDNN's over its packed copy, made for them).
TUNED_ROWS = (1, 2, 3, 4, 8, 16)
TUNE_REPS = 4
# A form replaces the untuned rule's only where its median took at most this share of the rule's time: on a
# machine where two forms are about as fast, start-up timings then do not flip the choice from one run to the next.
TUNE_MARGIN = 0.9
FORMS = ("split", "onednn", "linear", "panels")
# The forms a compiled step can hold: inductor lowers oneDNN's op only over weights it froze into the graph as
# constants, which the lone-row step's are not (they are read from the model at each call).
TRACEABLE_FORMS = ("split", "linear")


def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` through oneDNN's matmul, on the weight as it is (no packed copy).

    Why: on a CPU, F.linear goes to MKL, whose products of a few to a few hundred rows ran 1.5-2x
    slower than oneDNN's on the 2-core AMD EPYC (bench/matvec.py; at 16 rows F.linear read the
    weights at 7-10 GB/s). The op is the one inductor's CPU lowering calls for linear layers
    (torch.ops.mkldnn, underscored but kept: torch is pinned); results differ from F.linear's by float
    rounding only.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's own blocked copy of `weight` [out, in], for `onednn_linear` (an opaque mkldnn tensor, as many bytes).

    Why: from 4 to 64 rows, oneDNN's product over a weight it has packed ran 1.5-2x faster than over the weight
    as it is on the 2-core AMD EPYC (bench/matvec.py: 140-160 GFLOPS at 16 rows against 75-95), and a decode
    step of many streams is those products. The copy costs the weight's bytes again, so the runner keeps one
    only when told to (`Settings.packed_weights`). The op is the one inductor's CPU weight prepacking calls.
    Its batch-size hint picks the blocking; 4, 16 and 64 gave the same speeds from 4 to 128 rows.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT_ROWS)


def has_onednn_linear(weight: Tensor) -> bool:
    """oneDNN's product is there for `weight`: on a CPU, in float32, or in bfloat16 where the CPU has the
    instructions oneDNN needs for it (avx512_bf16 or AMX)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and bfloat16_products())


@functools.cache
def bfloat16_products() -> bool:
    """oneDNN computes bfloat16 products natively on this CPU: with AMX or avx512_bf16. (torch's own check,
    `_is_mkldnn_bf16_supported`, also admits any AVX-512 CPU, where oneDNN emulates them, slower than float32.)"""
    capability = torch._C._cpu._get_cpu_capability()  # underscored, but torch is pinned
    native = bool(capability.get("amx_bf16") or capability.get("avx512_bf16"))
    return native and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A Llama decoder layer's seven projections: q, k, v, o, gate, up, down."""
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


@dataclass(frozen=True)
class Product:
    """A weight's product with a step's rows in one of `FORMS`: `split_linear` up to `split_rows` rows, the panel
    products beyond where there is a panel copy, up to `PANEL_ROWS` rows, then oneDNN's (on a CPU, over its packed
    copy where there is one; F.linear elsewhere), unless `tuned` names the form for the step's row count."""

    weight: Tensor  # [out, in]
    blocks: Tensor | None  # the weight as [threads, out / threads, in] (a view), where it splits evenly on a CPU
    onednn: Tensor | None  # what oneDNN's product reads: `packed_weight(weight)` or the weight itself; None off a CPU
    split_rows: int  # rows up to which `blocks` are used, where `tuned` does not say
    tuned: tuple[str, ...] = ()  # the form for a product of n rows at index n - 1 (`LeanDecode.tune`)
    panels: PanelWeight | None = None  # the panel copy (`panel_product.py`), held instead of oneDNN's packed copy

    @classmethod
    def of(cls, weight: Tensor, *, pack: bool = False, panels: PanelLibrary | None = None) -> Product:
        """pack: keep a packed copy of the weight, the panel library's where it is given and takes the weight (float32
        on a CPU), else oneDNN's."""
        threads = torch.get_num_threads() if weight.device.type == "cpu" else 1
        split = threads > 1 and weight.shape[0] % threads == 0
        blocks = weight.view(threads, -1, weight.shape[1]) if split else None
        if pack and panels is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
            return cls(weight, blocks, weight if has_onednn_linear(weight) else None, SPLIT_ROWS_PACKED,
                       panels=panels.pack(weight))
        onednn = None
        if has_onednn_linear(weight):
            onednn = packed_weight(weight) if pack else weight
        packed = onednn is not None and onednn is not weight
        if weight.dtype == torch.bfloat16:
            return cls(weight, blocks, onednn, SPLIT_ROWS_PACKED_BF16 if packed else SPLIT_ROWS_BF16)
        return cls(weight, blocks, onednn, SPLIT_ROWS_PACKED if packed else SPLIT_ROWS)

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the packed copy, the panel library's or oneDNN's (0 without one)."""
        if self.panels is not None:
            return self.panels.panels.nbytes
        return 0 if self.onednn is None or self.onednn is self.weight else self.weight.nbytes

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms this product can run in, of `FORMS`."""
        held = {"split": self.blocks, "onednn": self.onednn, "linear": self.weight, "panels": self.panels}
        return tuple(f for f in FORMS if held[f] is not None)

    def form(self, rows: int) -> str:
        if 0 < rows <= len(self.tuned):
            return self.tuned[rows - 1]
        if self.blocks is not None and 0 < rows <= self.split_rows:
            return "split"
        if self.panels is not None and rows <= PANEL_ROWS:
            return "panels"
        return "onednn" if self.onednn is not None else "linear"

    def run(self, form: str, x: Tensor) -> Tensor:
        if form == "split":
            return split_linear(x, self.blocks)
        if form == "onednn":
            return onednn_linear(x, self.onednn)
        if form == "panels":
            return self.panels(x)
        return F.linear(x, self.weight)

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(self.form(x.shape[0]), x)


def choose_forms(default: Callable[[int], str], medians: dict[int, dict[str, float]]) -> tuple[str, ...]:
    """The form for 1 to max(medians) rows from each form's median time at the measured row counts (`medians`:
    rows -> form -> seconds), at n rows those at the first measured count >= n: the untuned rule's form (`default`)
    unless another took at most `TUNE_MARGIN` of its time or it was not timed; else the fastest."""
    measured = sorted(medians)
    chosen = []
    for rows in range(1, measured[-1] + 1):
        at = medians[next(m for m in measured if m >= rows)]
        usual = default(rows)
        fastest = min(at, key=at.__getitem__)
        chosen.append(usual if usual in at and at[usual] * TUNE_MARGIN < at[fastest] else fastest)
    return tuple(chosen)


def _spans(forms: tuple[str, ...]) -> str:
    """("linear", "linear", "onednn") -> "1-2 linear, 3 onednn"."""
    spans, first = [], 1
    for form, run in itertools.groupby(forms):
        last = first + len(list(run)) - 1
        spans.append(f"{first} {form}" if first == last else f"{first}-{last} {form}")
        first = last + 1
    return ", ".join(spans)


def tune_products(products: Sequence[Product], traced_rows: int = 0, reps: int = TUNE_REPS) -> tuple[str, ...]:
    """Time every form of `products` (weights of one shape, every layer's, read back to back as a step reads them)
    at each of `TUNED_ROWS`, forms interleaved in each of `reps` rounds, and choose from the medians. Up to
    `traced_rows` rows, only `TRACEABLE_FORMS` compete: those steps run compiled. Beside a panel copy oneDNN's product
    reads the weight as it is, and is not timed: the panel products took 0.54-0.59x its time at 2 to 16 rows
    (bench/matvec.py, a step's products), and timing it cost 1.7 s of start-up with the default model."""
    first = products[0]
    medians: dict[int, dict[str, float]] = {}
    for rows in TUNED_ROWS:
        x = torch.randn(rows, first.weight.shape[1], dtype=first.weight.dtype, device=first.weight.device)
        forms = [f for f in first.forms if (rows > traced_rows or f in TRACEABLE_FORMS)
                 and not (f == "onednn" and first.panels is not None)]
        times: dict[str, list[float]] = {form: [] for form in forms}
        for _ in range(reps + 1):  # the first round warms each form up and is not kept
            for form, kept in times.items():
                started = time.perf_counter()
                for product in products:
                    product.run(form, x)
                kept.append(time.perf_counter() - started)
        medians[rows] = {form: statistics.median(kept[1:]) for form, kept in times.items()}
    return choose_forms(first.form, medians)


@dataclass(frozen=True)
class _Layer:
    input_norm: Tensor
    qkv: Product  # [q + k + v features, hidden]
    o: Product
    post_norm: Tensor
    gate_up: Product  # [2 * intermediate, hidden]
    down: Product
    attn: nn.Module  # the layer's attention module, handed to the attention function as transformers does

    @property
    def products(self) -> tuple[Product, ...]:
        return self.qkv, self.o, self.gate_up, self.down


def supports(model: nn.Module) -> bool:
    """A Llama decoder with no biases, SiLU, plain RoPE and untouched projections, in float32 or (on a CPU
    whose oneDNN has bfloat16 products) in bfloat16."""
    cfg = model.config
    if model.dtype == torch.bfloat16:
        if model.device.type != "cpu" or not bfloat16_products():
            return False
    elif model.dtype != torch.float32:
        return False
    if cfg.model_type != "llama" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False
    if cfg.hidden_act != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return False
    inner = getattr(model, "model", None)
    return inner is not None and all(
        type(m) is nn.Linear for layer in inner.layers for m in projections(layer))


def split_linear(x: Tensor, blocks: Tensor) -> Tensor:
    """`F.linear(x, weight)` over `blocks`, the weight's rows as [blocks, out / blocks, in] (a view, no copy).

    Why: at a few rows, F.linear on a CPU is one matrix-vector product, which torch runs on one thread:
    on the 2-core AMD EPYC it read the weights at 11 GB/s, against 24 GB/s for one core's plain
    streaming read and 32 GB/s for two. `bmm` hands each block to a thread: 28-39 GB/s, about 3x
    faster over the model's weights at one row (per-shape figures in docs/internals/decode-profile.md).
    Each output is still one dot product over the full input; only its summation order may differ from
    F.linear's, by float rounding.
    """
    rows, (parts, width, depth) = x.shape[0], blocks.shape
    products = torch.bmm(blocks, x.t().expand(parts, depth, rows))  # [blocks, out / blocks, rows]
    return products.view(1, parts * width) if rows == 1 else products.permute(2, 0, 1).reshape(rows, -1)


def fuse_projections(first: nn.Linear, *rest: nn.Linear) -> Tensor:
    """One weight [sum of out features, in] for `first` and `rest`; each module's weight becomes a view of it."""
    modules = (first, *rest)
    fused = torch.cat([m.weight.detach() for m in modules])
    row = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row : row + rows], requires_grad=False)
        row += rows
    return fused


class LeanDecode:
    """The base model's decode forward over the engine's KV cache: packed rows in, next-token logits out."""

    def __init__(self, model: nn.Module, *, pack: bool = False, panels: PanelLibrary | None = None) -> None:
        """pack: keep packed copies of the products' weights for steps of many rows: the panel library's where it is
        given (`panel_product.py`), else oneDNN's (`packed_weight`)."""
        cfg, inner = model.config, model.model
        self.embed = inner.embed_tokens.weight
        product = functools.partial(Product.of, pack=pack, panels=panels)
        self.head = product(model.get_output_embeddings().weight)
        self.final_norm = inner.norm.weight
        self.eps = float(cfg.rms_norm_eps)
        self.rotary = inner.rotary_emb
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                layer.input_layernorm.weight, product(fuse_projections(a.q_proj, a.k_proj, a.v_proj)),
                product(a.o_proj.weight), layer.post_attention_layernorm.weight,
                product(fuse_projections(m.gate_proj, m.up_proj)), product(m.down_proj.weight), a,
            ))
        half = self.head_dim // 2
        self._sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)]).to(self.embed.device, self.embed.dtype)

    @torch.inference_mode()
    def tune(self, traced_rows: int = 0) -> None:
        """Choose each weight shape's product form per row count by timing them here (`tune_products`), on a CPU:
        which is fastest at a few rows differs between CPUs (split products on an AMD EPYC, where MKL's one-row
        product runs on one thread; MKL's F.linear on a Xeon, where the split products' `bmm` ran 2x slower).
        Called at start-up, in the thread that runs the steps, before any step is compiled (a compiled step keeps
        the forms it was traced with); steps of up to `traced_rows` rows will be (`tune_products`)."""
        if self.embed.device.type != "cpu":
            return
        started = time.perf_counter()
        roles = {"q/k/v": "qkv", "o": "o", "gate/up": "gate_up", "down": "down"}
        tuned = {name: tune_products([getattr(layer, role) for layer in self.layers], traced_rows)
                 for name, role in roles.items()}
        tuned["LM head"] = tune_products([self.head])  # outside the compiled step (`one_row`)
        self.layers = [replace(layer, **{role: replace(getattr(layer, role), tuned=tuned[name])
                                         for name, role in roles.items()}) for layer in self.layers]
        self.head = replace(self.head, tuned=tuned["LM head"])
        log.info("decode products timed in %.1f s; by rows: %s", time.perf_counter() - started,
                 "; ".join(f"{name} {_spans(forms)}" for name, forms in tuned.items()))

    def norm(self, h: Tensor, weight: Tensor) -> Tensor:
        """The model's RMSNorm, transformers' arithmetic: in float32 throughout; in bfloat16, normalised in float32
        and rounded before the weight's product, where `torch.rms_norm` would round after it."""
        if h.dtype == torch.float32:
            return torch.rms_norm(h, h.shape[-1:], weight, self.eps)
        return torch.rms_norm(h.float(), h.shape[-1:], None, self.eps).to(h.dtype) * weight

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight copies this forward holds beyond the model's own."""
        return self.head.packed_bytes + sum(p.packed_bytes for layer in self.layers for p in layer.products)

    def __call__(self, cache: KVCache, ids: Tensor, positions: Tensor, columns: Tensor,
                 layout: attention.Layout) -> Tensor:
        """ids, positions, columns: [N] (one token per row), written at `columns` of `cache`; logits [N, V] in
        float32. Called in inference mode (the runner's decode)."""
        return self.head(self.hidden(cache, ids, positions, columns, layout)).float()

    def hidden(self, cache: KVCache, ids: Tensor, positions: Tensor, columns: Tensor, layout: attention.Layout,
               edit: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """The final norm's output [N, hidden] for a step's packed tokens, a decode step's or a prefill's (its layout
        says which columns each token's query reads); `edit(i, h)` changes layer i's output h [N, hidden] in place
        (the runner's interventions, at prefill). Called in inference mode."""

        def attend(layer: _Layer, q: Tensor, pool_k: Tensor, pool_v: Tensor) -> Tensor:
            return attention.attention(layer.attn, q, pool_k, pool_v, None, scaling=self.scaling,
                                       **{attention.LAYOUT_KWARG: layout})[0]

        return self._hidden(cache, ids, positions, columns, attend, edit)

    def one_row(self, cache: KVCache, ids: Tensor, positions: Tensor, columns: Tensor, start: int,
                kv_len: int) -> Tensor:
        """`__call__` for one row whose keys are columns [start, start + kv_len), the `SingleDecode` layout's
        arithmetic, up to the LM head: the final norm's output [1, hidden], whose logits are `head`'s product.
        Written for torch.compile (`compiled.CompiledLoneRow`): `start` and `kv_len` are plain ints it can keep
        symbolic, no layout object reaches the graph, and the head's product stays out of it, free to take
        oneDNN's form, which a compiled graph cannot hold (`TRACEABLE_FORMS`)."""

        def attend(layer: _Layer, q: Tensor, pool_k: Tensor, pool_v: Tensor) -> Tensor:
            return attention.single_row(q, pool_k, pool_v, start, kv_len, self.scaling)

        return self._hidden(cache, ids, positions, columns, attend)

    def row_inputs(self, token: int, position: int, slot: Slot) -> tuple[Tensor, Tensor, Tensor]:
        """`one_row`'s tensors for `token` fed at `position` of `slot`: ids, positions, columns [1] each."""
        device = self.embed.device
        return (torch.tensor([token], device=device), torch.tensor([position], device=device),
                torch.tensor([slot.start + position], device=device))

    def one_row_logits(self, cache: KVCache, token: int, position: int, slot: Slot) -> Tensor:
        """The eager lone-row step's logits [1, V]: what the compiled and native steps are checked against."""
        hidden = self.one_row(cache, *self.row_inputs(token, position, slot), slot.start, position + 1)
        return self.head(hidden).float()

    def _hidden(self, cache: KVCache, ids: Tensor, positions: Tensor, columns: Tensor,
                attend: Callable[[_Layer, Tensor, Tensor, Tensor], Tensor],
                edit: Callable[[int, Tensor], None] | None = None) -> Tensor:
        n, d, heads, kv_heads = ids.shape[0], self.head_dim, self.heads, self.kv_heads
        h = F.embedding(ids, self.embed)  # [N, hidden]
        cos, sin = self.rotary(h, positions[None])  # [1, N, d], transformers' own values
        cos, sin = cos[0, :, None], (sin[0] * self._sign)[:, None]  # [N, 1, d]: broadcast over heads
        qk_heads = heads + kv_heads
        for i, layer in enumerate(self.layers):
            x = self.norm(h, layer.input_norm)
            qkv = layer.qkv(x).view(n, qk_heads + kv_heads, d)
            qk = qkv[:, :qk_heads]
            # rotate_half(x) * sin == flip(halves of x) * (sin with its first half negated)
            qk = qk * cos + qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2) * sin
            k, v = qk[:, heads:], qkv[:, qk_heads:]
            pool_k, pool_v = cache.k[i], cache.v[i]
            pool_k.index_copy_(1, columns, k.transpose(0, 1))
            pool_v.index_copy_(1, columns, v.transpose(0, 1))
            q = qk[:, :heads].transpose(0, 1).unsqueeze(0)  # [1, heads, N, d], as transformers hands it over
            o = attend(layer, q, pool_k, pool_v)  # [1, N, heads, d]
            h = h + layer.o(o.reshape(n, heads * d))
            x = self.norm(h, layer.post_norm)
            gate, up = layer.gate_up(x).chunk(2, -1)
            h = h + layer.down(F.silu(gate) * up)
            if edit is not None:
                edit(i, h)
        return self.norm(h, self.final_norm)
