"""The native adapter format (round trip, validation) and the pyreft importer."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from bench import common
from server.adapter_file import (
    METADATA_KEY,
    Adapter,
    AdapterError,
    build,
    import_pyreft,
    load,
    loads,
    make_intervention,
    save,
    sha256,
    to_bytes,
    validate_name,
)
from server.interventions import INTERVENTION_TYPES, Intervention, reference_apply
from server.model import ModelShape
from server.positions import Positions

DATA = Path(__file__).parent / "data" / "pyreft-emoji"
SHAPE = ModelShape("llama", 576, 30)
D = SHAPE.hidden_size
MAX_RANK = 64
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def gen_for(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_tensors(kind: str, rank: int, gen: torch.Generator, d: int = D, proj_bias: bool = False,
                   dtype: str = "float32") -> dict[str, torch.Tensor]:
    """`bench.common.random_tensors` stored in `dtype`, as a file of that dtype would hold them."""
    tensors = common.random_tensors(kind, rank, d, gen, proj_bias=proj_bias)
    return {k: v.to(TORCH_DTYPES[dtype]) for k, v in tensors.items()}


# (type, layer, rank, proj_bias): every type, several ranks, layers at both ends, a shared layer.
EVERY_TYPE = [
    ("loreft", 0, 4, False),
    ("noreft", 3, 2, True),
    ("consreft", 3, 7, False),
    ("lobireft", 10, 1, False),
    ("direft", 29, 5, False),
    ("nodireft", 12, 3, True),
    ("noreft", 15, 6, False),
    ("nodireft", 15, 64, False),
]


def every_type_adapter(dtype: str = "float32", positions: str = "f3+l3", share_weights: bool = False,
                       base: ModelShape = SHAPE, specs=EVERY_TYPE) -> Adapter:
    ivs = [
        make_intervention(i, kind, layer, rank,
                          random_tensors(kind, rank, gen_for(dtype, i), base.hidden_size, pb, dtype),
                          base, MAX_RANK, dtype)
        for i, (kind, layer, rank, pb) in enumerate(specs)
    ]
    return build(ivs, Positions.parse(positions), share_weights, base, dtype)


def one_adapter(kind: str = "loreft", rank: int = 4, layer: int = 4, base: ModelShape = SHAPE,
                dtype: str = "float32", positions: str = "f2+l2", share_weights: bool = True) -> Adapter:
    tensors = random_tensors(kind, rank, gen_for(kind, rank, layer), base.hidden_size, dtype=dtype)
    iv = make_intervention(0, kind, layer, rank, tensors, base, MAX_RANK, dtype)
    return build([iv], Positions.parse(positions), share_weights, base, dtype)


def unpack(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    return meta, dict(st_load(data))


def pack(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def assert_same_adapter(a: Adapter, b: Adapter) -> None:
    assert a.metadata() == b.metadata()
    assert a.positions == b.positions and a.share_weights == b.share_weights
    assert a.base == b.base and a.dtype == b.dtype
    assert len(a.interventions) == len(b.interventions)
    for x, y in zip(a.interventions, b.interventions, strict=True):
        assert (x.type, x.layer, x.rank) == (y.type, y.layer, y.rank)
        assert set(x.tensors) == set(y.tensors)
        for k in x.tensors:
            assert x.tensors[k].dtype == y.tensors[k].dtype
            assert torch.equal(x.tensors[k], y.tensors[k]), k


# ------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_every_type(dtype):
    adapter = every_type_adapter(dtype)
    assert sorted(adapter.types) == sorted(INTERVENTION_TYPES)
    data = to_bytes(adapter)
    back = loads(data, SHAPE, MAX_RANK)
    assert_same_adapter(adapter, back)
    assert back.layers == [0, 3, 10, 12, 15, 29]
    assert back.max_rank == 64
    assert [iv.type for iv in back.interventions] == [s[0] for s in EVERY_TYPE]  # order is kept
    assert "proj_bias" in back.interventions[1].tensors and "proj_bias" not in back.interventions[6].tensors
    # serialisation is deterministic, so the sha256 identifies the content
    assert to_bytes(back) == data
    assert sha256(data) == sha256(to_bytes(back))


def test_round_trip_metadata_document():
    adapter = every_type_adapter(positions="l5", share_weights=True)
    meta, tensors = unpack(to_bytes(adapter))
    assert meta == {
        "format_version": 1,
        "positions": "l5",
        "share_weights": True,
        "dtype": "float32",
        "base": {"model_type": "llama", "hidden_size": 576, "num_layers": 30},
        "interventions": [
            {"type": k, "layer": layer, "rank": r, "component": "block_output"} for k, layer, r, _ in EVERY_TYPE
        ],
    }
    assert set(tensors) == {
        f"interventions.{i}.{name}" for i, iv in enumerate(adapter.interventions) for name in iv.tensors
    }


def test_save_and_load_file(tmp_path):
    adapter = every_type_adapter()
    path = tmp_path / "mine.safetensors"
    save(adapter, path)
    assert_same_adapter(adapter, load(path, SHAPE, MAX_RANK))


def test_round_trip_keeps_arithmetic():
    adapter = every_type_adapter()
    back = loads(to_bytes(adapter), SHAPE, MAX_RANK)
    h = torch.randn(3, D, generator=gen_for("h"))
    for a, b in zip(adapter.interventions, back.interventions, strict=True):
        assert torch.equal(reference_apply(a, h), reference_apply(b, h))


def test_adapter_locations_follow_positions():
    adapter = every_type_adapter(positions="f2+l3", share_weights=False)
    locs = adapter.locations(10)
    assert locs == [[0, 1]] * 4 + [[7, 8, 9]] * 4


# ------------------------------------------------------------------------------------------------
# The real pyreft save (pyreft 0.1.0, LoReFT rank 4 on layers 4 and 10)
# ------------------------------------------------------------------------------------------------

FIXTURE_BINS = {
    4: DATA / "intkey_layer_4_comp_block_output_unit_pos_nunit_1#0.bin",
    10: DATA / "intkey_layer_10_comp_block_output_unit_pos_nunit_1#0.bin",
}


def test_import_real_pyreft_fixture():
    adapter = import_pyreft(DATA, "f2+l2", True, SHAPE, max_rank=64)
    expected = json.loads((DATA / "expected.json").read_text())["emoji"]
    assert [iv.layer for iv in adapter.interventions] == expected["layers"] == [4, 10]
    assert [iv.type for iv in adapter.interventions] == ["loreft", "loreft"]
    assert [iv.rank for iv in adapter.interventions] == [expected["rank"]] * 2 == [4, 4]
    assert str(adapter.positions) == expected["positions"] and adapter.share_weights is expected["share_weights"]
    assert adapter.dtype == "float32" and adapter.base == SHAPE
    for iv in adapter.interventions:
        state = torch.load(FIXTURE_BINS[iv.layer], map_location="cpu", weights_only=True)
        assert set(iv.tensors) == {"weight", "bias", "rotate_layer"}
        for name in ("weight", "bias", "rotate_layer"):
            assert torch.equal(iv.tensors[name], state[name]), name
    assert adapter.locations(16) == [[0, 1, 14, 15]] * 2
    # and it survives the native format unchanged
    assert_same_adapter(adapter, loads(to_bytes(adapter), SHAPE, MAX_RANK))


def test_import_real_fixture_refuses_wrong_base():
    with pytest.raises(AdapterError, match=r"rotate_layer has shape \[576, 4\], expected \[960, 4\]"):
        import_pyreft(DATA, "f2+l2", True, ModelShape("llama", 960, 32), max_rank=64)
    with pytest.raises(AdapterError, match="layer 10 is outside"):
        import_pyreft(DATA, "f2+l2", True, ModelShape("llama", 576, 8), max_rank=64)
    with pytest.raises(AdapterError, match="rank 4 is outside 1..2"):
        import_pyreft(DATA, "f2+l2", True, SHAPE, max_rank=2)


def test_import_real_fixture_unshared_and_bad_positions():
    adapter = import_pyreft(DATA, "f2+l2", False, SHAPE, max_rank=64)
    assert adapter.locations(16) == [[0, 1], [14, 15]]
    with pytest.raises(AdapterError, match="positions"):
        import_pyreft(DATA, "f2 l2", True, SHAPE, max_rank=64)


# ------------------------------------------------------------------------------------------------
# Synthesised pyreft saves of the other types, written the way pyreft + pyvene write them
# ------------------------------------------------------------------------------------------------


class LowRankRotateLayer(nn.Module):
    """pyreft.interventions.LowRankRotateLayer."""

    def __init__(self, n, m, init_orth=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m), requires_grad=True)
        if init_orth:
            nn.init.orthogonal_(self.weight)

    def forward(self, x):
        return torch.matmul(x.to(self.weight.dtype), self.weight)


class PyveneIntervention(nn.Module):
    """pyvene's Intervention base: registers `embed_dim` and `interchange_dim` buffers."""

    def __init__(self, embed_dim):
        super().__init__()
        self.register_buffer("embed_dim", torch.tensor(embed_dim))
        self.register_buffer("interchange_dim", torch.tensor(embed_dim))


class Loreft(PyveneIntervention):
    def __init__(self, d, r):
        super().__init__(d)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
        self.learned_source = nn.Linear(d, r)

    def forward(self, base):
        rotated_base = self.rotate_layer(base)
        output = base + torch.matmul((self.learned_source(base) - rotated_base), self.rotate_layer.weight.T)
        return output.to(base.dtype)

    def state_dict(self, *args, **kwargs):  # pyreft's override
        state_dict = OrderedDict()
        for k, v in self.learned_source.state_dict().items():
            state_dict[k] = v
        state_dict["rotate_layer"] = self.rotate_layer.weight.data
        return state_dict


class Noreft(PyveneIntervention):
    def __init__(self, d, r, add_bias):
        super().__init__(d)
        self.proj_layer = nn.Linear(d, r, bias=add_bias)
        self.learned_source = nn.Linear(d, r)

    def forward(self, base):
        proj_base = self.proj_layer(base)
        output = base + torch.matmul((self.learned_source(base) - proj_base), self.proj_layer.weight)
        return output.to(base.dtype)


class Consreft(PyveneIntervention):
    def __init__(self, d, r):
        super().__init__(d)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
        self.learned_source = nn.Parameter(torch.rand(r), requires_grad=True)

    def forward(self, base):
        rotated_base = self.rotate_layer(base)
        output = base + torch.matmul((self.learned_source - rotated_base), self.rotate_layer.weight.T)
        return output.to(base.dtype)


class Lobireft(PyveneIntervention):
    def __init__(self, d, r):
        super().__init__(d)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
        self.learned_source = nn.Parameter(torch.rand(r), requires_grad=True)

    def forward(self, base):
        output = base + torch.matmul(self.learned_source, self.rotate_layer.weight.T)
        return output.to(base.dtype)


class Direft(PyveneIntervention):
    def __init__(self, d, r):
        super().__init__(d)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
        self.learned_source = nn.Linear(d, r)

    def forward(self, base):
        cast_base = base.to(self.learned_source.weight.dtype)
        output = base + torch.matmul(
            (self.learned_source(cast_base)).to(self.rotate_layer.weight.dtype), self.rotate_layer.weight.T
        )
        return output.to(base.dtype)


class Nodireft(PyveneIntervention):
    def __init__(self, d, r, add_bias):
        super().__init__(d)
        self.proj_layer = nn.Linear(d, r, bias=add_bias)
        self.learned_source = nn.Linear(d, r)

    def forward(self, base):
        output = base + torch.matmul(self.learned_source(base), self.proj_layer.weight)
        return output.to(base.dtype)


PYREFT_CLASSES = {
    "loreft": ("LoreftIntervention", lambda d, r, b: Loreft(d, r)),
    "noreft": ("NoreftIntervention", lambda d, r, b: Noreft(d, r, b)),
    "consreft": ("ConsreftIntervention", lambda d, r, b: Consreft(d, r)),
    "lobireft": ("LobireftIntervention", lambda d, r, b: Lobireft(d, r)),
    "direft": ("DireftIntervention", lambda d, r, b: Direft(d, r)),
    "nodireft": ("NodireftIntervention", lambda d, r, b: Nodireft(d, r, b)),
}


def trained_module(kind: str, d: int, r: int, add_bias: bool, seed: int) -> nn.Module:
    """A pyreft-layout module with every parameter moved away from its initialisation."""
    torch.manual_seed(seed)
    module = PYREFT_CLASSES[kind][1](d, r, add_bias)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "original" in name:
                # torch's householder map reads the reflectors below the diagonal; the diagonal holds
                # signs (±1) that receive no gradient, so training only ever moves the rest
                noise = torch.randn_like(p) * 0.3
                noise.diagonal().zero_()
                p.add_(noise)
            else:
                p.add_(torch.randn_like(p))
    return module.eval()


def pyreft_key(layer: int, nth: int) -> str:
    return f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{nth}"


def write_pyreft_dir(path: Path, modules: list[tuple[str, int, nn.Module, int]],
                     component: str = "block_output") -> Path:
    """Save like pyvene's IntervenableModel.save(): config.json plus one intkey_{key}.bin each."""
    path.mkdir(parents=True, exist_ok=True)
    keys, types, reps = [], [], []
    seen: dict[int, int] = {}
    for kind, layer, module, rank in modules:
        nth = seen.get(layer, 0)
        seen[layer] = nth + 1
        key = pyreft_key(layer, nth)
        torch.save(module.state_dict(), path / f"intkey_{key}.bin")
        keys.append(key)
        types.append(f"<class 'pyreft.interventions.{PYREFT_CLASSES[kind][0]}'>")
        reps.append([layer, component, "pos", 1, rank] + [None] * 9)
    config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [D] * len(keys),
        "intervention_types": types,
        "mode": "parallel",
        "representations": reps,
        "sorted_keys": keys,
        "transformers_version": "4.45.1",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


SYNTH = [(kind, r, b) for kind in INTERVENTION_TYPES for r, b in ((3, False), (8, True))]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "rank", "add_bias"), SYNTH)
def test_import_synthesised_pyreft_save(tmp_path, kind, rank, add_bias):
    module = trained_module(kind, D, rank, add_bias, seed=zlib.crc32(f"{kind}{rank}".encode()))
    src = write_pyreft_dir(tmp_path / "save", [(kind, 7, module, rank)])
    adapter = import_pyreft(src, "l3", True, SHAPE, max_rank=MAX_RANK)
    (iv,) = adapter.interventions
    assert (iv.type, iv.layer, iv.rank) == (kind, 7, rank)
    assert adapter.dtype == "float32"
    if kind in ("noreft", "nodireft"):
        assert ("proj_bias" in iv.tensors) is add_bias
    h = torch.randn(4, 6, D, generator=gen_for("h", kind, rank))
    with torch.no_grad():
        want = module(h)
    got = reference_apply(iv, h)
    assert (want - h).abs().max() > 1e-2  # the module really intervenes
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if kind in ("consreft", "lobireft", "direft", "loreft"):
        with torch.no_grad():
            torch.testing.assert_close(iv.tensors["rotate_layer"], module.rotate_layer.weight, atol=1e-6, rtol=0)
    # and the native round trip keeps it
    assert_same_adapter(adapter, loads(to_bytes(adapter), SHAPE, MAX_RANK))


@pytest.mark.slow
def test_import_synthesised_mixed_save_keeps_order(tmp_path):
    modules = []
    plan = [("direft", 2, 4), ("noreft", 2, 2), ("loreft", 9, 5), ("consreft", 20, 3), ("lobireft", 20, 1),
            ("nodireft", 29, 6)]
    for i, (kind, layer, rank) in enumerate(plan):
        modules.append((kind, layer, trained_module(kind, D, rank, i % 2 == 1, seed=100 + i), rank))
    src = write_pyreft_dir(tmp_path / "save", modules)
    adapter = import_pyreft(src, "f1+l1", False, SHAPE, max_rank=MAX_RANK)
    assert [(iv.type, iv.layer, iv.rank) for iv in adapter.interventions] == plan
    h = torch.randn(5, D, generator=gen_for("mixed"))
    for iv, (_, _, module, _) in zip(adapter.interventions, modules, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(reference_apply(iv, h), module(h), atol=1e-5, rtol=1e-5)


def test_imported_rotation_is_not_the_raw_parametrisation_state(tmp_path):
    # The stored `original` of torch's orthogonal parametrisation is not R; R must be rebuilt.
    module = trained_module("consreft", D, 4, False, seed=5)
    state = module.state_dict()
    original = state["rotate_layer.parametrizations.weight.original"]
    with torch.no_grad():
        R = module.rotate_layer.weight
    assert (original - R).abs().max() > 1e-2
    src = write_pyreft_dir(tmp_path / "save", [("consreft", 1, module, 4)])
    iv = import_pyreft(src, "f1", True, SHAPE, MAX_RANK).interventions[0]
    torch.testing.assert_close(iv.tensors["rotate_layer"], R, atol=1e-6, rtol=0)


def test_import_pyreft_default_dtypes(tmp_path):
    # pyreft's README builds LoreftIntervention(embed_dim=..., low_rank_dimension=4) without `dtype`:
    # learned_source is then cast to bfloat16 while rotate_layer stays float32.
    module = trained_module("loreft", D, 4, False, seed=9)
    module.learned_source.to(torch.bfloat16)
    src = write_pyreft_dir(tmp_path / "save", [("loreft", 3, module, 4)])
    adapter = import_pyreft(src, "l1", True, SHAPE, MAX_RANK)
    h = torch.randn(2, D, generator=gen_for("bf16"))
    iv = adapter.interventions[0]
    got = reference_apply(iv, h.to(TORCH_DTYPES[adapter.dtype])).float()
    with torch.no_grad():
        rotated = module.rotate_layer(h.bfloat16())
        want = h + torch.matmul(module.learned_source(h.bfloat16()) - rotated, module.rotate_layer.weight.T)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# Native format failure paths
# ------------------------------------------------------------------------------------------------


def refuse(data: bytes, match: str, base: ModelShape = SHAPE, max_rank: int = MAX_RANK) -> str:
    with pytest.raises(AdapterError, match=match) as info:
        loads(data, base, max_rank)
    return str(info.value)


def edited(meta_edit=None, tensor_edit=None, adapter: Adapter | None = None) -> bytes:
    meta, tensors = unpack(to_bytes(adapter or one_adapter()))
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    return pack(meta, tensors)


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(0) + bytes(range(256)) * 8,
        b"",
        b"\x00" * 7,
        b'{"positions": "f2+l2", "interventions": []}',
        b"PK\x03\x04" + b"\x00" * 200,
        (5).to_bytes(8, "little") + b"hello",
        (2).to_bytes(8, "little") + b"[]",
        (0).to_bytes(8, "little"),
    ],
    ids=["random", "empty", "short", "json", "zip", "header-not-json", "header-list", "zero-header"],
)
def test_refuses_non_safetensors(data):
    refuse(data, "safetensors")


def test_refuses_safetensors_without_metadata():
    refuse(st_save({"x": torch.zeros(2)}), f"no '{METADATA_KEY}' metadata")
    refuse(st_save({"x": torch.zeros(2)}, metadata={"format": "pt"}), f"no '{METADATA_KEY}' metadata")


def test_refuses_metadata_not_json():
    data = st_save({"x": torch.zeros(2)}, metadata={METADATA_KEY: "{not json"})
    refuse(data, "not valid JSON")
    refuse(st_save({"x": torch.zeros(2)}, metadata={METADATA_KEY: "[1, 2]"}), "must be a JSON object")


def test_refuses_truncated_file():
    data = to_bytes(one_adapter())
    refuse(data[:-10], "safetensors")


def test_refuses_wrong_hidden_size():
    data = to_bytes(one_adapter(base=ModelShape("llama", 960, 30)))
    msg = refuse(data, "hidden size")
    assert "960" in msg and "576" in msg


def test_refuses_wrong_layer_count():
    msg = refuse(edited(lambda m: m["base"].update(num_layers=24)), "layer")
    assert "24" in msg and "30" in msg


def test_refuses_wrong_model_type():
    msg = refuse(edited(lambda m: m["base"].update(model_type="qwen2")), "model type")
    assert "qwen2" in msg and "llama" in msg


@pytest.mark.parametrize("layer", [30, -1, 1000])
def test_refuses_layer_out_of_range(layer):
    def set_layer(m):
        m["interventions"][0]["layer"] = layer

    refuse(edited(set_layer), f"layer {layer} is outside the base model's layers 0..29")


def test_refuses_rank_above_max_rank():
    data = to_bytes(one_adapter(rank=8))
    refuse(data, r"rank 8 is outside 1\.\.4", max_rank=4)
    assert loads(data, SHAPE, 8).max_rank == 8


def test_refuses_rank_zero():
    def zero_rank(m):
        m["interventions"][0]["rank"] = 0

    def empty_tensors(t):
        t["interventions.0.rotate_layer"] = torch.zeros(D, 0)
        t["interventions.0.weight"] = torch.zeros(0, D)
        t["interventions.0.bias"] = torch.zeros(0)

    refuse(edited(zero_rank, empty_tensors), r"rank 0 is outside")


def test_refuses_rank_disagreeing_with_tensors():
    def rank_five(m):
        m["interventions"][0]["rank"] = 5

    refuse(edited(rank_five), r"tensor \w+ has shape \[[0-9, ]+\], expected \[(576, )?5(, 576)?\]")


def test_refuses_wrong_tensor_shape():
    def widen(t):
        t["interventions.0.weight"] = torch.zeros(4, D + 1)

    refuse(edited(tensor_edit=widen), r"tensor weight has shape \[4, 577\], expected \[4, 576\]")

    def transpose(t):
        t["interventions.0.rotate_layer"] = t["interventions.0.rotate_layer"].T.contiguous()

    refuse(edited(tensor_edit=transpose), "tensor rotate_layer has shape")


def test_refuses_missing_tensor():
    refuse(edited(tensor_edit=lambda t: t.pop("interventions.0.bias")), "missing tensors bias")


def test_refuses_unexpected_tensors():
    def add_in_intervention(t):
        t["interventions.0.foo"] = torch.zeros(4)

    refuse(edited(tensor_edit=add_in_intervention), "unexpected tensors foo")

    def add_stray(t):
        t["stray"] = torch.zeros(1)

    refuse(edited(tensor_edit=add_stray), "unexpected tensors in adapter file: stray")

    def add_other_intervention(t):
        t["interventions.1.bias"] = torch.zeros(4)

    refuse(edited(tensor_edit=add_other_intervention), "interventions.1.bias")

    def proj_bias_on_loreft(t):
        t["interventions.0.proj_bias"] = torch.zeros(4)

    refuse(edited(tensor_edit=proj_bias_on_loreft), "unexpected tensors proj_bias")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_refuses_non_finite(bad, name):
    def poison(t):
        t[f"interventions.0.{name}"] = t[f"interventions.0.{name}"].clone()
        t[f"interventions.0.{name}"].view(-1)[1] = bad

    refuse(edited(tensor_edit=poison), f"tensor {name} holds NaN or Inf")


@pytest.mark.parametrize("kind", ["loreft", "consreft", "lobireft", "direft"])
def test_refuses_non_orthonormal_rotation(kind):
    adapter = one_adapter(kind)

    def scramble(t):
        t["interventions.0.rotate_layer"] = torch.randn(D, 4, generator=gen_for("bad R"))

    refuse(edited(tensor_edit=scramble, adapter=adapter), "rotate_layer is not orthonormal")

    def stretch(t):
        t["interventions.0.rotate_layer"] = t["interventions.0.rotate_layer"] * 1.01

    refuse(edited(tensor_edit=stretch, adapter=adapter), "rotate_layer is not orthonormal")

    def nudge(t):  # float32 rounding-level deviations are fine
        t["interventions.0.rotate_layer"] = t["interventions.0.rotate_layer"] * (1 + 1e-6)

    loads(edited(tensor_edit=nudge, adapter=adapter), SHAPE, MAX_RANK)


def test_noreft_projection_need_not_be_orthonormal():
    adapter = one_adapter("noreft")
    assert loads(to_bytes(adapter), SHAPE, MAX_RANK).interventions[0].type == "noreft"


def test_refuses_dtype_mismatch():
    def half_one(t):
        t["interventions.0.weight"] = t["interventions.0.weight"].half()

    refuse(edited(tensor_edit=half_one), "tensor weight is torch.float16, the adapter says float32")
    refuse(edited(lambda m: m.update(dtype="bfloat16")), "the adapter says bfloat16")


def test_refuses_float64():
    def widen_all(t):
        for k in t:
            t[k] = t[k].double()

    refuse(edited(tensor_edit=widen_all), "float64")
    refuse(edited(lambda m: m.update(dtype="float64"), widen_all), "dtype 'float64' is not one of")


def test_refuses_integer_tensor():
    def ints(t):
        t["interventions.0.bias"] = torch.zeros(4, dtype=torch.int32)

    refuse(edited(tensor_edit=ints), "int32")


@pytest.mark.parametrize("positions", ["f2 l2", "", "x3", "f0", 3])
def test_refuses_bad_positions_in_metadata(positions):
    refuse(edited(lambda m: m.update(positions=positions)), "positions")


def test_refuses_unshared_both_sides_with_odd_count():
    data = to_bytes(one_adapter(share_weights=True, positions="f2+l2"))
    refuse(edited(lambda m: m.update(share_weights=False), adapter=loads(data, SHAPE, MAX_RANK)), "even count")
    # direct construction is refused the same way
    iv = one_adapter().interventions[0]
    with pytest.raises(AdapterError, match="even count, got 3"):
        build([iv, iv, iv], Positions.parse("f1+l1"), False, SHAPE, "float32")
    # one-sided positions and shared weights are fine with any count
    build([iv, iv, iv], Positions.parse("f1"), False, SHAPE, "float32")
    build([iv, iv, iv], Positions.parse("f1+l1"), True, SHAPE, "float32")


def test_refuses_no_interventions():
    def none(m):
        m["interventions"] = []

    refuse(edited(none, lambda t: t.clear() or t.update(x=torch.zeros(1))), "no interventions|unexpected")
    with pytest.raises(AdapterError, match="no interventions"):
        build([], Positions.parse("f1"), True, SHAPE, "float32")


def test_refuses_unknown_type():
    def superreft(m):
        m["interventions"][0]["type"] = "superreft"

    msg = refuse(edited(superreft), "unknown type 'superreft'")
    assert "loreft" in msg  # lists the known ones


def test_refuses_other_component():
    def mlp(m):
        m["interventions"][0]["component"] = "mlp_output"

    refuse(edited(mlp), "component 'mlp_output' is not supported")


@pytest.mark.parametrize("version", [2, 0, "1", None, 1.0, True])
def test_refuses_bad_format_version(version):
    refuse(edited(lambda m: m.update(format_version=version)), "format_version")


@pytest.mark.parametrize(
    ("key", "value"),
    [("share_weights", "yes"), ("share_weights", 1), ("dtype", 32), ("base", "llama"), ("interventions", {})],
)
def test_refuses_wrongly_typed_metadata(key, value):
    refuse(edited(lambda m: m.update({key: value})), f"'{key}' has the wrong type")


@pytest.mark.parametrize("key", ["format_version", "positions", "share_weights", "dtype", "base", "interventions"])
def test_refuses_missing_metadata(key):
    refuse(edited(lambda m: m.pop(key)), f"lacks '{key}'")


@pytest.mark.parametrize(("key", "value"), [("layer", "4"), ("layer", True), ("rank", 4.0), ("type", None)])
def test_refuses_wrongly_typed_intervention_fields(key, value):
    def change(m):
        m["interventions"][0][key] = value

    refuse(edited(change), f"intervention 0 '{key}' has the wrong type")


def test_make_intervention_direct_checks():
    t = random_tensors("loreft", 4, gen_for("direct"))
    with pytest.raises(AdapterError, match="layer 30 is outside"):
        make_intervention(0, "loreft", 30, 4, t, SHAPE, MAX_RANK, "float32")
    with pytest.raises(AdapterError, match="rank 0 is outside"):
        make_intervention(0, "loreft", 3, 0, t, SHAPE, MAX_RANK, "float32")
    with pytest.raises(AdapterError, match="intervention 2: unknown type 'LoReFT'"):
        make_intervention(2, "LoReFT", 3, 4, t, SHAPE, MAX_RANK, "float32")
    iv = make_intervention(0, "loreft", 3, 4, t, SHAPE, MAX_RANK, "float32")
    assert isinstance(iv, Intervention) and iv.rank == 4


# ------------------------------------------------------------------------------------------------
# pyreft importer failure paths
# ------------------------------------------------------------------------------------------------


def fixture_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "emoji"
    dst.mkdir()
    for name in ("config.json", *(p.name for p in FIXTURE_BINS.values())):
        shutil.copy(DATA / name, dst / name)
    return dst


def edit_config(src: Path, edit) -> None:
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))


def refuse_import(src: Path, match: str, positions: str = "f2+l2") -> str:
    with pytest.raises(AdapterError, match=match) as info:
        import_pyreft(src, positions, True, SHAPE, MAX_RANK)
    return str(info.value)


def test_import_missing_config(tmp_path):
    src = fixture_copy(tmp_path)
    (src / "config.json").unlink()
    refuse_import(src, "no config.json")


def test_import_config_not_json(tmp_path):
    src = fixture_copy(tmp_path)
    (src / "config.json").write_text("{oops")
    refuse_import(src, "config.json is not valid JSON")


@pytest.mark.parametrize("key", ["sorted_keys", "intervention_types", "representations"])
def test_import_config_lacks_field(tmp_path, key):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c.pop(key))
    refuse_import(src, f"lacks '{key}'")


def test_import_config_fields_disagree(tmp_path):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c["sorted_keys"].pop())
    refuse_import(src, "disagree")


def test_import_missing_bin(tmp_path):
    src = fixture_copy(tmp_path)
    FIXTURE_NAME = FIXTURE_BINS[10].name
    (src / FIXTURE_NAME).unlink()
    refuse_import(src, f"lacks {FIXTURE_NAME}")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(str(self.marker)),))


def test_import_refuses_pickle_carrying_code(tmp_path):
    src = fixture_copy(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"weight": torch.zeros(4, D), "bias": _RunsCode(marker), "rotate_layer": torch.zeros(D, 4)}
    torch.save(evil, src / FIXTURE_BINS[4].name)
    msg = refuse_import(src, "not a tensors-only torch file")
    assert FIXTURE_BINS[4].name in msg
    assert not marker.exists()
    # the payload is live: an unsafe load of the same file would have run it
    proof = tmp_path / "proof"
    torch.save({"bias": _RunsCode(proof)}, tmp_path / "proof.bin")
    torch.load(tmp_path / "proof.bin", weights_only=False)
    assert proof.exists()


def test_import_refuses_non_tensor_state(tmp_path):
    src = fixture_copy(tmp_path)
    torch.save({"weight": 3, "bias": [1.0]}, src / FIXTURE_BINS[4].name)
    refuse_import(src, "does not hold a state dict of tensors")
    torch.save([torch.zeros(3)], src / FIXTURE_BINS[4].name)
    refuse_import(src, "does not hold a state dict of tensors")


def test_import_refuses_garbage_bin(tmp_path):
    src = fixture_copy(tmp_path)
    (src / FIXTURE_BINS[4].name).write_bytes(b"not a torch file at all")
    refuse_import(src, "not a tensors-only torch file")


def test_import_refuses_state_missing_tensor(tmp_path):
    src = fixture_copy(tmp_path)
    state = torch.load(FIXTURE_BINS[4], weights_only=True)
    del state["rotate_layer"]
    torch.save(state, src / FIXTURE_BINS[4].name)
    refuse_import(src, "lacks 'rotate_layer'")


@pytest.mark.parametrize(
    "type_repr",
    ["<class 'pyvene.models.interventions.VanillaIntervention'>",
     "<class 'pyreft.interventions.LowRankRotateLayer'>",
     "<class 'pyvene.models.interventions.LowRankRotatedSpaceIntervention'>"],
)
def test_import_refuses_unsupported_class(tmp_path, type_repr):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c["intervention_types"].__setitem__(1, type_repr))
    msg = refuse_import(src, "is not supported")
    assert type_repr in msg


@pytest.mark.parametrize("component", ["mlp_output", "attention_output", "block_input"])
def test_import_refuses_unsupported_component(tmp_path, component):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c["representations"][0].__setitem__(1, component))
    refuse_import(src, f"component '{component}' is not supported")


@pytest.mark.slow
def test_import_synthesised_component_refused(tmp_path):
    module = trained_module("direft", D, 2, False, seed=1)
    src = write_pyreft_dir(tmp_path / "save", [("direft", 1, module, 2)], component="mlp_output")
    refuse_import(src, "component 'mlp_output' is not supported", positions="f1")


def test_import_refuses_non_orthonormal_loreft(tmp_path):
    src = fixture_copy(tmp_path)
    state = torch.load(FIXTURE_BINS[4], weights_only=True)
    state["rotate_layer"] = state["rotate_layer"] * 2
    torch.save(state, src / FIXTURE_BINS[4].name)
    refuse_import(src, "not orthonormal")


def test_import_refuses_unshared_odd_count(tmp_path):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: [c[k].pop() for k in ("sorted_keys", "intervention_types", "representations")])
    assert import_pyreft(src, "f2+l2", True, SHAPE, MAX_RANK).layers == [4]
    with pytest.raises(AdapterError, match="even count"):
        import_pyreft(src, "f2+l2", False, SHAPE, MAX_RANK)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["emoji", "a", "Z", "0", "9-_.", "v1.2-final_B", "x" * 64, "a..b", "a.", "a-", "a_",
                                  "a.safetensors"])
def test_validate_name_accepts(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["a/b", "/etc", "..", ".", "../x", "..a", ".hidden", "-flag", "_under", "has space", " lead", "trail ", "x" * 65,
     "a" + "x" * 64, "", "tab\t", "new\nline", "trailing\n", "back\\slash", "é", "aé", "\u0661", "a\u200b", "ａ",
     "a:b", "a/", None, 5],
)
def test_validate_name_refuses(name):
    with pytest.raises(AdapterError, match="adapter name .* is invalid") as info:
        validate_name(name)
    assert repr(name) in str(info.value)


# ------------------------------------------------------------------------------------------------
# Regressions: malformed metadata, pyreft dtypes and paths.
# ------------------------------------------------------------------------------------------------


def _raw_safetensors(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body


@pytest.mark.parametrize(
    "header",
    [{"__metadata__": ["x"]}, {"__metadata__": "x"}, {"__metadata__": {METADATA_KEY: 5}}],
    ids=["list", "string", "value-int"],
)
def test_refuses_malformed_metadata_block(header):
    refuse(_raw_safetensors(header), "metadata")


@pytest.mark.parametrize("rep", ["x", [4], [None, "block_output"], ["four", "block_output"]],
                         ids=["string", "short", "layer-none", "layer-str"])
def test_import_refuses_malformed_representation(tmp_path, rep):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c["representations"].__setitem__(0, rep))
    refuse_import(src, "pyreft")


@pytest.mark.parametrize("layer", [4.7, True])
def test_import_refuses_non_integer_layer(tmp_path, layer):
    src = fixture_copy(tmp_path)
    edit_config(src, lambda c: c["representations"][0].__setitem__(0, layer))
    refuse_import(src, "layer")


def test_import_refuses_key_escaping_the_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(FIXTURE_BINS[4], outside / "secret.bin")
    src = fixture_copy(tmp_path)
    (src / "intkey_x").mkdir()
    edit_config(src, lambda c: c["sorted_keys"].__setitem__(0, "x/../../outside/secret"))
    refuse_import(src, "key")


@pytest.mark.slow
def test_import_bfloat16_consreft_save(tmp_path):
    module = trained_module("consreft", D, 4, False, seed=21)
    with torch.no_grad():  # what module.to(torch.bfloat16) would have saved
        for p in module.parameters():
            p.copy_(p.bfloat16().float())
    src = write_pyreft_dir(tmp_path / "save", [("consreft", 1, module, 4)])
    state = torch.load(next(src.glob("*.bin")), weights_only=True)
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}, next(src.glob("*.bin")))
    iv = import_pyreft(src, "l1", True, SHAPE, MAX_RANK).interventions[0]
    h = torch.randn(3, D, generator=gen_for("bf16 consreft"))
    with torch.no_grad():
        want = module(h)
    got = reference_apply(iv, h.to(iv.tensors["bias"].dtype)).float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
