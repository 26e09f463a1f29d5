"""The six ReFT intervention types: pyreft 0.1.0's arithmetic, per example and batched.

Every type is written here in one common form so that a batch mixing adapters of any types
and ranks is a single gather plus two batched matmuls per intervened layer:

    s     = (W h + b) - (P h + p)      # r-vector
    h_new = h + s @ A                  # A: [r, d], the "write-back" matrix

    type      W        b      P         p     A
    loreft    weight   bias   Rᵀ        0     Rᵀ
    noreft    weight   bias   proj_w    proj_b proj_w
    consreft  0        bias   Rᵀ        0     Rᵀ
    lobireft  0        bias   0         0     Rᵀ
    direft    weight   bias   0         0     Rᵀ
    nodireft  weight   bias   0         0     proj_w

R is pyreft's `rotate_layer` [d, r] with orthonormal columns, so Rᵀ [r, d] has orthonormal rows.
Zero blocks contribute exact zeros, so the common form computes the same numbers as pyreft's
per-type formulas (see `reference_apply`, which transcribes those formulas literally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INTERVENTION_TYPES = ("loreft", "noreft", "consreft", "lobireft", "direft", "nodireft")

# Tensors each type stores (native format names), with their shapes in terms of (d, r).
# "proj_bias" is optional for noreft/nodireft (pyreft's add_bias); nodireft never reads it.
TENSOR_SPECS: dict[str, dict[str, tuple[str, ...]]] = {
    "loreft": {"rotate_layer": ("d", "r"), "weight": ("r", "d"), "bias": ("r",)},
    "noreft": {"proj_weight": ("r", "d"), "weight": ("r", "d"), "bias": ("r",)},
    "consreft": {"rotate_layer": ("d", "r"), "bias": ("r",)},
    "lobireft": {"rotate_layer": ("d", "r"), "bias": ("r",)},
    "direft": {"rotate_layer": ("d", "r"), "weight": ("r", "d"), "bias": ("r",)},
    "nodireft": {"proj_weight": ("r", "d"), "weight": ("r", "d"), "bias": ("r",)},
}
OPTIONAL_TENSORS = {"noreft": ("proj_bias",), "nodireft": ("proj_bias",)}
ORTHONORMAL_TYPES = ("loreft", "consreft", "lobireft", "direft")


@dataclass(frozen=True)
class Intervention:
    """One intervention of an adapter: its type, the layer it acts after, and its tensors."""

    type: str
    layer: int
    rank: int
    tensors: dict[str, Tensor]


def reference_apply(iv: Intervention, h: Tensor) -> Tensor:
    """pyreft 0.1.0's forward for `iv` on hidden states h [..., d], written as pyreft writes it."""
    t = iv.tensors
    linear = torch.nn.functional.linear
    if iv.type == "loreft":
        rotated = torch.matmul(h, t["rotate_layer"])
        return h + torch.matmul(linear(h, t["weight"], t["bias"]) - rotated, t["rotate_layer"].T)
    if iv.type == "noreft":
        proj = linear(h, t["proj_weight"], t.get("proj_bias"))
        return h + torch.matmul(linear(h, t["weight"], t["bias"]) - proj, t["proj_weight"])
    if iv.type == "consreft":
        rotated = torch.matmul(h, t["rotate_layer"])
        return h + torch.matmul(t["bias"] - rotated, t["rotate_layer"].T)
    if iv.type == "lobireft":
        return h + torch.matmul(t["bias"], t["rotate_layer"].T)
    if iv.type == "direft":
        return h + torch.matmul(linear(h, t["weight"], t["bias"]), t["rotate_layer"].T)
    if iv.type == "nodireft":
        return h + torch.matmul(linear(h, t["weight"], t["bias"]), t["proj_weight"])
    raise ValueError(f"unknown intervention type {iv.type!r}")


@dataclass(frozen=True)
class CommonForm:
    """An intervention's tensors in the common form (W, b, P, p, A), padded to rank `rank`."""

    W: Tensor  # [r, d]
    b: Tensor  # [r]
    P: Tensor  # [r, d]
    p: Tensor  # [r]
    A: Tensor  # [r, d]

    def padded(self, rank: int) -> CommonForm:
        """Zero rows up to `rank`: they add exact zeros, so padded forms compute the same result."""
        pad = rank - self.A.shape[0]
        if pad == 0:
            return self

        def grow(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 2 else (0, pad)).contiguous()

        return CommonForm(*(grow(x) for x in (self.W, self.b, self.P, self.p, self.A)))

    def to(self, device: torch.device, dtype: torch.dtype) -> CommonForm:
        return CommonForm(*(x.to(device=device, dtype=dtype) for x in (self.W, self.b, self.P, self.p, self.A)))

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.W, self.b, self.P, self.p, self.A))


def common_form(iv: Intervention, rank: int | None = None) -> CommonForm:
    """Rewrite `iv` in the common form; zero-pad to `rank` so different ranks can be stacked."""
    t = iv.tensors
    r = iv.rank
    write = t["proj_weight"] if iv.type in ("noreft", "nodireft") else t["rotate_layer"].T
    zeros_rd = torch.zeros_like(write)
    zeros_r = write.new_zeros(r)
    W = t.get("weight", zeros_rd)
    if iv.type in ("loreft", "consreft"):
        P, p = write, zeros_r
    elif iv.type == "noreft":
        P, p = write, t.get("proj_bias", zeros_r)
    else:
        P, p = zeros_rd, zeros_r
    form = CommonForm(*(x.contiguous() for x in (W, t["bias"], P, p, write)))
    return form if rank is None else form.padded(rank)


@dataclass(frozen=True)
class StackedForms:
    """Common forms of several interventions stacked on a leading slot axis, ready to gather."""

    WP: Tensor  # [S, 2r, d]: W rows then P rows, so both projections are one bmm
    bp: Tensor  # [S, 2r]
    A: Tensor  # [S, r, d]

    @staticmethod
    def stack(forms: list[CommonForm]) -> StackedForms:
        return StackedForms(
            WP=torch.stack([torch.cat([f.W, f.P]) for f in forms]),
            bp=torch.stack([torch.cat([f.b, f.p]) for f in forms]),
            A=torch.stack([f.A for f in forms]),
        )


def batched_apply(x: Tensor, stacked: StackedForms, slots: Tensor) -> Tensor:
    """Apply, to each row of x [N, d], the intervention in slot `slots[i]`: one gather, two bmm."""
    WP = stacked.WP.index_select(0, slots)  # [N, 2r, d]
    bp = stacked.bp.index_select(0, slots)  # [N, 2r]
    A = stacked.A.index_select(0, slots)  # [N, r, d]
    r = A.shape[1]
    proj = torch.baddbmm(bp.unsqueeze(2), WP, x.unsqueeze(2)).squeeze(2)  # [N, 2r]
    s = proj[:, :r] - proj[:, r:]
    return x + torch.bmm(s.unsqueeze(1), A).squeeze(1)
