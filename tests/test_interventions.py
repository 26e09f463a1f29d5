"""The six intervention types: contract math, pyreft's forward math, and the batched common form."""

from __future__ import annotations

import zlib

import pytest
import torch

from server.interventions import (
    INTERVENTION_TYPES,
    Intervention,
    StackedForms,
    batched_apply,
    common_form,
    reference_apply,
)

D = 48


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def orthonormal_rows(r: int, d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """An r×d matrix with orthonormal rows."""
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def random_parts(kind: str, r: int, gen: torch.Generator, d: int = D, proj_bias: bool = False,
                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The contract's named matrices for one intervention: R, W, b, W1, W2, b2."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    parts = {"b": randn(r)}
    if kind in ("loreft", "consreft", "lobireft", "direft"):
        parts["R"] = orthonormal_rows(r, d, gen, dtype)
    if kind in ("loreft", "direft"):
        parts["W"] = randn(r, d) / d**0.5
    if kind in ("noreft", "nodireft"):
        parts["W1"] = randn(r, d) / d**0.5
        parts["W2"] = randn(r, d) / d**0.5
        if proj_bias:
            parts["b2"] = randn(r)
    return parts


def to_intervention(kind: str, parts: dict[str, torch.Tensor], layer: int = 0) -> Intervention:
    """Native tensor names (rotate_layer is pyreft's [d, r] layout, i.e. Rᵀ)."""
    t: dict[str, torch.Tensor] = {"bias": parts["b"]}
    if "R" in parts:
        t["rotate_layer"] = parts["R"].T.contiguous()
    if "W" in parts:
        t["weight"] = parts["W"]
    if "W1" in parts:
        t["weight"] = parts["W1"]
        t["proj_weight"] = parts["W2"]
    if "b2" in parts:
        t["proj_bias"] = parts["b2"]
    return Intervention(type=kind, layer=layer, rank=parts["b"].shape[0], tensors=t)


def contract_formula(kind: str, p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The contract's math, one hidden state h (d,) at a time, as matrix-vector products."""
    b = p["b"]
    if kind == "loreft":
        R, W = p["R"], p["W"]
        return h + R.T @ (W @ h + b - R @ h)
    if kind == "noreft":
        W1, W2 = p["W1"], p["W2"]
        b2 = p.get("b2", torch.zeros_like(b))
        return h + W2.T @ (W1 @ h + b - (W2 @ h + b2))
    if kind == "consreft":
        R = p["R"]
        return h + R.T @ (b - R @ h)
    if kind == "lobireft":
        return h + p["R"].T @ b
    if kind == "direft":
        R, W = p["R"], p["W"]
        return h + R.T @ (W @ h + b)
    if kind == "nodireft":
        return h + p["W2"].T @ (p["W1"] @ h + b)
    raise AssertionError(kind)


def contract_rows(kind: str, p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    flat = h.reshape(-1, h.shape[-1])
    return torch.stack([contract_formula(kind, p, row) for row in flat]).reshape(h.shape)


# ---------------------------------------------------------------------------------------------
# pyreft 0.1.0's forward methods (pyreft/interventions.py), transcribed literally with `self.x`
# replaced by the module's parameters in a dict keyed as torch names them. act_fn is "linear"
# (identity, pyreft's default) and dropout is the identity outside training.
# ---------------------------------------------------------------------------------------------


def _act_fn(x):  # ACT2FN["linear"]
    return x


def _dropout(x):  # torch.nn.Dropout in eval mode
    return x


def _linear(m, prefix, x):  # torch.nn.Linear.forward
    return torch.nn.functional.linear(x, m[f"{prefix}.weight"], m.get(f"{prefix}.bias"))


def _rotate_layer(m, x):  # LowRankRotateLayer.forward
    return torch.matmul(x.to(m["rotate_layer.weight"].dtype), m["rotate_layer.weight"])


def pyreft_loreft_forward(m, base):
    rotated_base = _rotate_layer(m, base)
    output = base + torch.matmul(
        (_act_fn(_linear(m, "learned_source", base)) - rotated_base), m["rotate_layer.weight"].T
    )
    return _dropout(output.to(base.dtype))


def pyreft_noreft_forward(m, base):
    proj_base = _linear(m, "proj_layer", base)
    output = base + torch.matmul(
        (_act_fn(_linear(m, "learned_source", base)) - proj_base), m["proj_layer.weight"]
    )
    return _dropout(output.to(base.dtype))


def pyreft_consreft_forward(m, base):
    rotated_base = _rotate_layer(m, base)
    output = base + torch.matmul(
        (m["learned_source"] - rotated_base), m["rotate_layer.weight"].T
    )
    return output.to(base.dtype)


def pyreft_lobireft_forward(m, base):
    output = base + torch.matmul(
        m["learned_source"], m["rotate_layer.weight"].T
    )
    return _dropout(output.to(base.dtype))


def pyreft_direft_forward(m, base):
    cast_base = base.to(m["learned_source.weight"].dtype)
    output = base + torch.matmul(
        (_act_fn(_linear(m, "learned_source", cast_base))).to(m["rotate_layer.weight"].dtype),
        m["rotate_layer.weight"].T,
    )
    return _dropout(output.to(base.dtype))


def pyreft_nodireft_forward(m, base):
    output = base + torch.matmul(
        _act_fn(_linear(m, "learned_source", base)), m["proj_layer.weight"]
    )
    return _dropout(output.to(base.dtype))


PYREFT_FORWARD = {
    "loreft": pyreft_loreft_forward,
    "noreft": pyreft_noreft_forward,
    "consreft": pyreft_consreft_forward,
    "lobireft": pyreft_lobireft_forward,
    "direft": pyreft_direft_forward,
    "nodireft": pyreft_nodireft_forward,
}


def pyreft_module_params(kind: str, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The contract's matrices laid out as pyreft's module attributes hold them."""
    m: dict[str, torch.Tensor] = {}
    if "R" in p:
        m["rotate_layer.weight"] = p["R"].T  # LowRankRotateLayer.weight is [d, r]
    if kind in ("loreft", "direft"):
        m["learned_source.weight"], m["learned_source.bias"] = p["W"], p["b"]
    if kind in ("consreft", "lobireft"):
        m["learned_source"] = p["b"]  # an nn.Parameter of shape [r]
    if kind in ("noreft", "nodireft"):
        m["learned_source.weight"], m["learned_source.bias"] = p["W1"], p["b"]
        m["proj_layer.weight"] = p["W2"]
        if "b2" in p:
            m["proj_layer.bias"] = p["b2"]
    return m


# ---------------------------------------------------------------------------------------------

CASES = [(kind, r, False) for kind in INTERVENTION_TYPES for r in (1, 4, 7)] + [
    ("noreft", 3, True),
    ("nodireft", 3, True),
]


@pytest.mark.parametrize(("kind", "rank", "proj_bias"), CASES)
def test_reference_apply_matches_contract_math(kind, rank, proj_bias):
    gen = torch.Generator().manual_seed(seed_of(kind, rank, proj_bias))
    parts = random_parts(kind, rank, gen, proj_bias=proj_bias)
    iv = to_intervention(kind, parts)
    h = torch.randn(2, 5, D, generator=gen)
    got = reference_apply(iv, h)
    assert got.shape == h.shape
    torch.testing.assert_close(got, contract_rows(kind, parts, h), atol=1e-5, rtol=1e-5)
    # and it is not the identity: every type moves h
    assert (got - h).abs().max() > 1e-3


@pytest.mark.parametrize(("kind", "rank", "proj_bias"), CASES)
def test_reference_apply_matches_pyreft_forward(kind, rank, proj_bias):
    gen = torch.Generator().manual_seed(seed_of("pyreft", kind, rank, proj_bias))
    parts = random_parts(kind, rank, gen, proj_bias=proj_bias)
    iv = to_intervention(kind, parts)
    h = torch.randn(3, 4, D, generator=gen)
    want = PYREFT_FORWARD[kind](pyreft_module_params(kind, parts), h)
    torch.testing.assert_close(reference_apply(iv, h), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", INTERVENTION_TYPES)
def test_reference_apply_float64_is_tight(kind):
    # In float64 the three formulations agree to ~1e-12: a wrong sign or transpose cannot hide.
    gen = torch.Generator().manual_seed(7)
    parts = random_parts(kind, 5, gen, proj_bias=True, dtype=torch.float64)
    iv = to_intervention(kind, parts)
    h = torch.randn(6, D, generator=gen, dtype=torch.float64)
    got = reference_apply(iv, h)
    torch.testing.assert_close(got, contract_rows(kind, parts, h), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, PYREFT_FORWARD[kind](pyreft_module_params(kind, parts), h), atol=1e-10, rtol=1e-10)


def test_nodireft_ignores_projection_bias():
    # pyreft's NodireftIntervention never reads proj_layer.bias.
    gen = torch.Generator().manual_seed(3)
    parts = random_parts("nodireft", 4, gen, proj_bias=True)
    h = torch.randn(5, D, generator=gen)
    with_bias = reference_apply(to_intervention("nodireft", parts), h)
    parts.pop("b2")
    without = reference_apply(to_intervention("nodireft", parts), h)
    torch.testing.assert_close(with_bias, without)


def test_noreft_uses_projection_bias():
    gen = torch.Generator().manual_seed(4)
    parts = random_parts("noreft", 4, gen, proj_bias=True)
    h = torch.randn(5, D, generator=gen)
    with_bias = reference_apply(to_intervention("noreft", parts), h)
    parts.pop("b2")
    without = reference_apply(to_intervention("noreft", parts), h)
    assert (with_bias - without).abs().max() > 1e-3


def test_loreft_on_its_own_subspace_output_is_target():
    # LoReFT edits h so that R h' = W h + b, leaving the orthogonal complement untouched.
    gen = torch.Generator().manual_seed(5)
    parts = random_parts("loreft", 6, gen, dtype=torch.float64)
    h = torch.randn(D, generator=gen, dtype=torch.float64)
    out = reference_apply(to_intervention("loreft", parts), h)
    R, W, b = parts["R"], parts["W"], parts["b"]
    torch.testing.assert_close(R @ out, W @ h + b)
    complement = torch.eye(D, dtype=torch.float64) - R.T @ R
    torch.testing.assert_close(complement @ out, complement @ h)


# A batch mixing all six types with different ranks (and both noreft bias variants).
MIXED = [
    ("loreft", 4, False),
    ("noreft", 2, True),
    ("consreft", 7, False),
    ("lobireft", 1, False),
    ("direft", 5, False),
    ("nodireft", 3, True),
    ("noreft", 6, False),
    ("loreft", 8, False),
]


def _mixed_interventions(gen, dtype=torch.float32):
    return [to_intervention(k, random_parts(k, r, gen, proj_bias=pb, dtype=dtype), layer=i)
            for i, (k, r, pb) in enumerate(MIXED)]


@pytest.mark.parametrize("rmax", [8, 11])
def test_batched_apply_matches_reference_per_row(rmax):
    gen = torch.Generator().manual_seed(11)
    ivs = _mixed_interventions(gen)
    stacked = StackedForms.stack([common_form(iv, rank=rmax) for iv in ivs])
    assert stacked.A.shape == (len(ivs), rmax, D)
    slots = torch.cat([torch.arange(len(ivs)), torch.randint(0, len(ivs), (56,), generator=gen)])
    x = torch.randn(len(slots), D, generator=gen)
    out = batched_apply(x, stacked, slots)
    assert out.shape == x.shape
    for i, s in enumerate(slots.tolist()):
        torch.testing.assert_close(out[i], reference_apply(ivs[s], x[i]), atol=1e-5, rtol=1e-5)
    # the slot really selects the intervention: shifting every row's slot changes every row
    shifted = batched_apply(x, stacked, (slots + 1) % len(ivs))
    assert ((shifted - out).abs().amax(dim=1) > 1e-3).all()


def test_batched_apply_float64_exact_to_rounding():
    gen = torch.Generator().manual_seed(12)
    ivs = _mixed_interventions(gen, dtype=torch.float64)
    stacked = StackedForms.stack([common_form(iv, rank=8) for iv in ivs])
    slots = torch.randint(0, len(ivs), (40,), generator=gen)
    x = torch.randn(40, D, generator=gen, dtype=torch.float64)
    out = batched_apply(x, stacked, slots)
    want = torch.stack([reference_apply(ivs[s], x[i]) for i, s in enumerate(slots.tolist())])
    torch.testing.assert_close(out, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize(("kind", "rank", "proj_bias"), CASES)
def test_common_form_unpadded_and_padded_agree(kind, rank, proj_bias):
    gen = torch.Generator().manual_seed(13 + rank)
    iv = to_intervention(kind, random_parts(kind, rank, gen, proj_bias=proj_bias))
    x = torch.randn(9, D, generator=gen)
    want = reference_apply(iv, x)
    slots = torch.zeros(9, dtype=torch.long)
    for rmax in (None, rank, rank + 3):
        form = common_form(iv, rank=rmax)
        expected_rank = rank if rmax is None else rmax
        for m in (form.W, form.P, form.A):
            assert m.shape == (expected_rank, D)
        assert form.b.shape == form.p.shape == (expected_rank,)
        out = batched_apply(x, StackedForms.stack([form]), slots)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_common_form_does_not_depend_on_tensor_order():
    # A tensors dict whose first entry is the bias (rank-sized) must still give d-wide blocks.
    gen = torch.Generator().manual_seed(14)
    for kind in INTERVENTION_TYPES:
        iv = to_intervention(kind, random_parts(kind, 3, gen, proj_bias=True))
        reordered = Intervention(iv.type, iv.layer, iv.rank, dict(sorted(iv.tensors.items())))
        assert next(iter(reordered.tensors)) == "bias"
        form = common_form(reordered, rank=5)
        for m in (form.W, form.P, form.A):
            assert m.shape == (5, D), kind
        x = torch.randn(4, D, generator=gen)
        out = batched_apply(x, StackedForms.stack([form]), torch.zeros(4, dtype=torch.long))
        torch.testing.assert_close(out, reference_apply(iv, x), atol=1e-5, rtol=1e-5)


def test_reference_apply_rejects_unknown_type():
    iv = Intervention(type="superreft", layer=0, rank=1, tensors={"bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="superreft"):
        reference_apply(iv, torch.zeros(D))
