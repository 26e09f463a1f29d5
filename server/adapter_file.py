"""The native adapter format (one .safetensors file) and the pyreft importer.

A native file holds tensors named `interventions.{i}.{tensor}` (names per type in
`interventions.TENSOR_SPECS`) and one metadata entry, `reft_adapter`, a JSON document:

    {"format_version": 1, "positions": "f2+l2", "share_weights": true, "dtype": "float32",
     "base": {"model_type": "llama", "hidden_size": 576, "num_layers": 30},
     "interventions": [{"type": "loreft", "layer": 4, "rank": 4, "component": "block_output"}, ...]}

Everything is validated before an adapter is accepted: a bad file is refused with a message
that names the problem, and nothing about it is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from server.interventions import (
    INTERVENTION_TYPES,
    OPTIONAL_TENSORS,
    ORTHONORMAL_TYPES,
    TENSOR_SPECS,
    Intervention,
    common_form,
)
from server.model import ModelShape
from server.positions import Positions, PositionsError

FORMAT_VERSION = 1
METADATA_KEY = "reft_adapter"
COMPONENT = "block_output"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ORTHONORMAL_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a leading "." would hide the file
_PYREFT_CLASSES = {
    "LoreftIntervention": "loreft",
    "NoreftIntervention": "noreft",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
    "DireftIntervention": "direft",
    "NodireftIntervention": "nodireft",
}


class AdapterError(ValueError):
    """An adapter file or directory that cannot be served; the message says why."""


@runtime_checkable
class ServedAdapter(Protocol):
    """What the engine applies for a request: one `Adapter`, or a `Composite` of several.

    The batch plan reads the interventions in order and, per intervention, the prompt positions it
    acts on; records and logs read the layers, types and rank. Which version is applied (name,
    version, sha256) is the `AdapterRef` that holds it, for one adapter and a composition alike.
    """

    @property
    def interventions(self) -> tuple[Intervention, ...]: ...

    @property
    def layers(self) -> list[int]: ...

    @property
    def types(self) -> list[str]: ...

    @property
    def max_rank(self) -> int: ...

    def locations(self, prompt_length: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class Adapter:
    """A validated adapter: its interventions in order, where they act, and the base it fits."""

    interventions: tuple[Intervention, ...]
    positions: Positions
    share_weights: bool
    base: ModelShape
    dtype: str

    @property
    def layers(self) -> list[int]:
        return sorted({iv.layer for iv in self.interventions})

    @property
    def types(self) -> list[str]:
        return sorted({iv.type for iv in self.interventions})

    @property
    def max_rank(self) -> int:
        return max(iv.rank for iv in self.interventions)

    def locations(self, prompt_length: int) -> list[list[int]]:
        return self.positions.locations(prompt_length, len(self.interventions), self.share_weights)

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "positions": str(self.positions),
            "share_weights": self.share_weights,
            "dtype": self.dtype,
            "base": {"model_type": self.base.model_type, "hidden_size": self.base.hidden_size,
                     "num_layers": self.base.num_layers},
            "interventions": [
                {"type": iv.type, "layer": iv.layer, "rank": iv.rank, "component": COMPONENT}
                for iv in self.interventions
            ],
        }


MAX_COMPOSED = 8
MAX_INTERVENTIONS = 64  # per adapter (REFT_MAX_INTERVENTIONS): one per layer and position group of a 32-layer base


@dataclass(frozen=True)
class Composite:
    """Several adapters applied in one forward, in the order named.

    It offers what the engine's batch plan reads from an Adapter: the interventions in order and,
    per intervention, its positions. Each part keeps its own positions rule, and on a layer that
    several parts act on, their interventions apply one after another, each reading what the
    previous wrote, exactly as several interventions of one adapter do.
    """

    parts: tuple[Adapter, ...]

    @property
    def interventions(self) -> tuple[Intervention, ...]:
        return tuple(iv for part in self.parts for iv in part.interventions)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for part in self.parts for layer in part.layers})

    @property
    def types(self) -> list[str]:
        return sorted({kind for part in self.parts for kind in part.types})

    @property
    def max_rank(self) -> int:
        return max(part.max_rank for part in self.parts)

    def locations(self, prompt_length: int) -> list[list[int]]:
        return [locs for part in self.parts for locs in part.locations(prompt_length)]


def composition(name: str | list[str]) -> list[str]:
    """The adapter names in a composed request ("a+b" or ["a", "b"]), at most MAX_COMPOSED."""
    names = name.split("+") if isinstance(name, str) else list(name)
    if len(names) > MAX_COMPOSED:
        raise AdapterError(f"at most {MAX_COMPOSED} adapters can be composed in one request, got {len(names)}")
    if not names or any(not n for n in names):
        raise AdapterError(f"adapter composition {name!r} has an empty name; write it as 'a+b' or [\"a\", \"b\"]")
    return names


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is invalid: a letter or digit, then letters, digits, '-', '_' or '.'; "
            "at most 64 characters"
        )
    return name


def to_bytes(adapter: Adapter) -> bytes:
    tensors = {
        f"interventions.{i}.{key}": value.contiguous()
        for i, iv in enumerate(adapter.interventions)
        for key, value in iv.tensors.items()
    }
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(adapter.metadata())})


def save(adapter: Adapter, path: Path) -> None:
    """Write `adapter` to `path` (callers needing atomicity write to a temporary name first)."""
    Path(path).write_bytes(to_bytes(adapter))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short_message(exc: BaseException) -> str:
    """An exception's message cut to a line: json's messages can quote the bad input."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _metadata_of(data: bytes) -> dict:
    """Read the safetensors header ourselves so a bad header gets a precise message."""
    if len(data) < 8:
        raise AdapterError("not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8:
        raise AdapterError("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:  # also integers of 4,301+ digits and deep nesting
        raise AdapterError(f"not a safetensors file: header is not valid JSON: {short_message(exc)}") from exc
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file: header is not a JSON object")
    block = header.get("__metadata__") or {}
    if not isinstance(block, dict):
        raise AdapterError("not a safetensors file: its __metadata__ is not a JSON object")
    raw = block.get(METADATA_KEY)
    if raw is None:
        raise AdapterError(f"safetensors file has no '{METADATA_KEY}' metadata: not a reft-serve adapter")
    if not isinstance(raw, str):
        raise AdapterError(f"'{METADATA_KEY}' metadata must be a string holding JSON")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"'{METADATA_KEY}' metadata is not valid JSON: {short_message(exc)}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"'{METADATA_KEY}' metadata must be a JSON object")
    return meta


def check_count(count: int, max_interventions: int) -> None:
    """Every intervention is a step of Python per prefill chunk: bound how many one adapter has."""
    if count > max_interventions:
        raise AdapterError(
            f"adapter has {count} interventions; at most {max_interventions} are allowed (REFT_MAX_INTERVENTIONS)"
        )


def _require(meta: Mapping, key: str, kind: type | tuple[type, ...], where: str = "metadata") -> object:
    if key not in meta:
        raise AdapterError(f"{where} lacks '{key}'")
    value = meta[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AdapterError(f"{where} '{key}' has the wrong type: {value!r}")
    return value


def loads(data: bytes, base: ModelShape, max_rank: int, max_interventions: int = MAX_INTERVENTIONS) -> Adapter:
    """Parse and validate native adapter bytes against the loaded base model."""
    meta = _metadata_of(data)
    specs = meta.get("interventions")
    if isinstance(specs, list):
        check_count(len(specs), max_interventions)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"not a valid safetensors file: {exc}") from exc
    version = _require(meta, "format_version", int)
    if version != FORMAT_VERSION:
        raise AdapterError(f"adapter format_version {version} is not supported (this server reads {FORMAT_VERSION})")
    try:
        positions = Positions.parse(_require(meta, "positions", str))
    except PositionsError as exc:
        raise AdapterError(str(exc)) from exc
    share_weights = _require(meta, "share_weights", bool)
    dtype = _require(meta, "dtype", str)
    if dtype not in DTYPES:
        raise AdapterError(f"adapter dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base_meta = _require(meta, "base", dict)
    adapter_base = ModelShape(
        model_type=_require(base_meta, "model_type", str, "metadata base"),
        hidden_size=_require(base_meta, "hidden_size", int, "metadata base"),
        num_layers=_require(base_meta, "num_layers", int, "metadata base"),
    )
    check_base(adapter_base, base)
    specs = _require(meta, "interventions", list)
    interventions = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise AdapterError(f"intervention {i}: metadata entry must be an object")
        iv_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"interventions.{i}.")}
        interventions.append(
            make_intervention(
                i, _require(spec, "type", str, f"intervention {i}"), _require(spec, "layer", int, f"intervention {i}"),
                _require(spec, "rank", int, f"intervention {i}"), iv_tensors, base, max_rank, dtype,
                spec.get("component", COMPONENT),
            )
        )
    known = {f"interventions.{i}.{k}" for i, iv in enumerate(interventions) for k in iv.tensors}
    extra = sorted(set(tensors) - known)
    if extra:
        raise AdapterError(f"unexpected tensors in adapter file: {', '.join(extra[:5])}")
    return build(interventions, positions, share_weights, base, dtype)


def load(path: Path, base: ModelShape, max_rank: int, max_interventions: int = MAX_INTERVENTIONS) -> Adapter:
    return loads(Path(path).read_bytes(), base, max_rank, max_interventions)


def check_base(adapter_base: ModelShape, base: ModelShape) -> None:
    if adapter_base.hidden_size != base.hidden_size:
        raise AdapterError(
            f"adapter was made for hidden size {adapter_base.hidden_size}, the base model has {base.hidden_size}"
        )
    if adapter_base.num_layers != base.num_layers:
        raise AdapterError(
            f"adapter was made for a {adapter_base.num_layers}-layer model, the base model has {base.num_layers} layers"
        )
    if adapter_base.model_type != base.model_type:
        raise AdapterError(
            f"adapter was made for model type {adapter_base.model_type!r}, the base model is {base.model_type!r}"
        )


def make_intervention(
    index: int, kind: str, layer: int, rank: int, tensors: Mapping[str, Tensor], base: ModelShape,
    max_rank: int, dtype: str, component: str = COMPONENT,
) -> Intervention:
    """Validate one intervention's type, layer, rank, tensor shapes, dtype and values."""
    where = f"intervention {index}"
    if kind not in INTERVENTION_TYPES:
        raise AdapterError(f"{where}: unknown type {kind!r} (known: {', '.join(INTERVENTION_TYPES)})")
    if component != COMPONENT:
        raise AdapterError(f"{where}: component {component!r} is not supported (only {COMPONENT!r})")
    if not 0 <= layer < base.num_layers:
        raise AdapterError(f"{where}: layer {layer} is outside the base model's layers 0..{base.num_layers - 1}")
    if not 1 <= rank <= min(max_rank, base.hidden_size):
        raise AdapterError(
            f"{where}: rank {rank} is outside 1..{min(max_rank, base.hidden_size)} (the configured maximum rank)"
        )
    spec = TENSOR_SPECS[kind]
    allowed = set(spec) | set(OPTIONAL_TENSORS.get(kind, ()))
    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise AdapterError(f"{where} ({kind}): missing tensors {', '.join(missing)}")
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise AdapterError(f"{where} ({kind}): unexpected tensors {', '.join(unknown)}")
    dims = {"d": base.hidden_size, "r": rank}
    shapes = dict(spec, **{name: ("r",) for name in OPTIONAL_TENSORS.get(kind, ())})
    for name, value in tensors.items():
        want = tuple(dims[s] for s in shapes[name])
        if tuple(value.shape) != want:
            raise AdapterError(f"{where} ({kind}): tensor {name} has shape {list(value.shape)}, expected {list(want)}")
        if value.dtype != DTYPES[dtype]:
            raise AdapterError(f"{where} ({kind}): tensor {name} is {value.dtype}, the adapter says {dtype}")
        if not torch.isfinite(value).all():
            raise AdapterError(f"{where} ({kind}): tensor {name} holds NaN or Inf values")
    if kind in ORTHONORMAL_TYPES:
        R = tensors["rotate_layer"].float()
        err = (R.T @ R - torch.eye(rank)).abs().max().item()
        if err > ORTHONORMAL_TOLERANCE[dtype]:
            raise AdapterError(f"{where} ({kind}): rotate_layer is not orthonormal (max |RᵀR - I| = {err:.3g})")
    return Intervention(type=kind, layer=layer, rank=rank, tensors={k: v.contiguous() for k, v in tensors.items()})


def check_range(adapter: Adapter, dtype: torch.dtype) -> None:
    """Refuse an adapter whose interventions can push a hidden state out of the serving dtype's range.

    In the common form (`server.interventions`) every type computes, per intervention,
        u = W h + b,  v = P h + p,  h' = h + Aᵀ (u - v).
    For |h|∞ ≤ H, each of u_k, v_k and s_k = u_k - v_k is at most
        S_k(H) = (‖W_k‖₁ + ‖P_k‖₁) H + |b_k| + |p_k|,
    and each coordinate of h' at most H + max_i Σ_k |A_ki| S_k(H): upper bounds, whatever the
    signs of h, so every intermediate and the output stay finite when both are at most M, the
    dtype's largest finite value. H is √M (256 in float16, about 1.8e19 in bfloat16 and float32):
    an intervention may not turn a state of √M into an overflow, which allows a gain of about √M.
    Trained adapters are far from that (the bundled ones have a gain of at most 21 by this bound),
    while a rank-512 random LoReFT (gain about 680) is refused in float16 and a weight near the
    range of the dtype is refused in every dtype. Computed in float64, so the bound cannot
    overflow itself. Each intervention is checked alone; several on one layer compose their gains.
    """
    top = torch.finfo(dtype).max
    h = top ** 0.5
    for i, iv in enumerate(adapter.interventions):
        form = common_form(iv)
        W, P, b, p, A = (x.double() for x in (form.W, form.P, form.b, form.p, form.A))
        s = (W.abs().sum(1) + P.abs().sum(1)) * h + b.abs() + p.abs()  # [r]
        out = h + (A.abs().T @ s).max().item()
        worst = max(s.max().item(), out)
        if not worst <= top:  # also NaN
            raise AdapterError(
                f"intervention {i} ({iv.type}, layer {iv.layer}) can overflow {str(dtype).removeprefix('torch.')}: "
                f"on hidden states up to {h:.4g} it can reach {worst:.4g}, over the largest value {top:.4g}"
            )


def build(
    interventions: list[Intervention], positions: Positions, share_weights: bool, base: ModelShape, dtype: str
) -> Adapter:
    if not interventions:
        raise AdapterError("adapter has no interventions")
    if not share_weights and positions.first and positions.last and len(interventions) % 2:
        raise AdapterError(
            f"positions {positions} without shared weights gives the prefix to the first half of the "
            f"interventions and the suffix to the second half: it needs an even count, got {len(interventions)}"
        )
    return Adapter(tuple(interventions), positions, share_weights, base, dtype)


class _RotateLayer(nn.Module):
    """Same parameter layout as pyreft's LowRankRotateLayer, to rebuild its orthogonal weight."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, r))


def _orthogonal_weight(state: Mapping[str, Tensor], prefix: str) -> Tensor:
    """Rebuild R from torch's orthogonal parametrisation state, as pyreft's forward sees it."""
    original = state.get(f"{prefix}.parametrizations.weight.original")
    if original is None:
        raise AdapterError(f"pyreft state lacks {prefix}.parametrizations.weight.original")
    if original.dim() != 2:
        raise AdapterError(f"pyreft {prefix} has shape {list(original.shape)}, expected a matrix [d, r]")
    layer = nn.utils.parametrizations.orthogonal(_RotateLayer(*original.shape))
    sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        layer.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        raise AdapterError(f"pyreft {prefix} state does not match torch's orthogonal parametrisation: {exc}") from exc
    with torch.no_grad():
        return layer.weight.detach().clone()


def _pyreft_tensors(kind: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map one pyreft intervention state dict onto the native tensor names."""
    def get(key: str) -> Tensor:
        if key not in state:
            raise AdapterError(f"pyreft {kind} state lacks '{key}' (has: {', '.join(sorted(state))})")
        return state[key]

    if kind == "loreft":
        return {"rotate_layer": get("rotate_layer"), "weight": get("weight"), "bias": get("bias")}
    if kind in ("noreft", "nodireft"):
        out = {"proj_weight": get("proj_layer.weight"), "weight": get("learned_source.weight"),
               "bias": get("learned_source.bias")}
        if "proj_layer.bias" in state:
            out["proj_bias"] = state["proj_layer.bias"]
        return out
    rotate = _orthogonal_weight(state, "rotate_layer")
    if kind in ("consreft", "lobireft"):
        return {"rotate_layer": rotate, "bias": get("learned_source")}
    return {"rotate_layer": rotate, "weight": get("learned_source.weight"), "bias": get("learned_source.bias")}


def import_pyreft(
    src: Path, positions: str, share_weights: bool, base: ModelShape, max_rank: int,
    max_interventions: int = MAX_INTERVENTIONS,
) -> Adapter:
    """Convert a directory written by pyreft's ReftModel.save() into a validated Adapter.

    The `.bin` files are read with torch.load(weights_only=True): tensors only, never code.
    """
    src = Path(src)
    try:
        config = json.loads((src / "config.json").read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{src} has no config.json: not a pyreft save directory") from exc
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"pyreft config.json is not valid JSON: {short_message(exc)}") from exc
    try:
        pos = Positions.parse(positions)
    except PositionsError as exc:
        raise AdapterError(str(exc)) from exc
    try:
        keys = list(config["sorted_keys"])
        types = list(config["intervention_types"])
        reps = list(config["representations"])
    except (KeyError, TypeError) as exc:
        raise AdapterError(f"pyreft config.json lacks {exc}") from exc
    if not (len(keys) == len(types) == len(reps)) or not keys:
        raise AdapterError("pyreft config.json: sorted_keys, intervention_types and representations disagree")
    check_count(len(keys), max_interventions)
    loaded = []
    for i, (key, type_repr, rep) in enumerate(zip(keys, types, reps, strict=True)):
        if not isinstance(key, str) or not key or "/" in key or "\\" in key or "\0" in key or key in (".", ".."):
            raise AdapterError(f"pyreft config.json: sorted key {key!r} is not a plain file-name part")
        cls = str(type_repr).rsplit(".", 1)[-1].strip("'>")
        kind = _PYREFT_CLASSES.get(cls)
        if kind is None:
            raise AdapterError(f"pyreft intervention {key}: type {type_repr} is not supported")
        if isinstance(rep, list) and len(rep) >= 2:
            layer, component = rep[0], rep[1]
        elif isinstance(rep, dict):
            layer, component = rep.get("layer"), rep.get("component")
        else:
            raise AdapterError(f"pyreft intervention {key}: representation {rep!r} is not understood")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise AdapterError(f"pyreft intervention {key}: layer {layer!r} is not an integer")
        path = src / f"intkey_{key}.bin"
        if not path.is_file():
            raise AdapterError(f"pyreft directory lacks {path.name}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "refuse this file"
            raise AdapterError(f"{path.name} is not a tensors-only torch file: {exc}") from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise AdapterError(f"{path.name} does not hold a state dict of tensors")
        tensors = _pyreft_tensors(kind, state)
        if tensors["bias"].dim() != 1:  # its length is the rank, read before the shapes are checked
            raise AdapterError(f"{path.name}: bias has shape {list(tensors['bias'].shape)}, expected a vector [r]")
        bad = sorted({str(v.dtype) for v in tensors.values() if not v.is_floating_point()})
        if bad:
            raise AdapterError(f"{path.name}: tensors of dtype {', '.join(bad)} are not floating point")
        loaded.append((i, kind, layer, component, tensors))
    # pyreft mixes dtypes by default (learned_source bfloat16, rotate_layer float32) and R is rebuilt
    # in float32: keep one shared dtype when there is one, otherwise widen everything to float32.
    found = {v.dtype for *_, tensors in loaded for v in tensors.values()}
    dtype_name = next((n for n, d in DTYPES.items() if {d} == found), "float32")
    interventions = [
        make_intervention(
            i, kind, layer, tensors["bias"].shape[0], {k: v.to(DTYPES[dtype_name]) for k, v in tensors.items()},
            base, max_rank, dtype_name, str(component),
        )
        for i, kind, layer, component, tensors in loaded
    ]
    return build(interventions, pos, share_weights, base, dtype_name)
