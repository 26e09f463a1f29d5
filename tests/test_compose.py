"""Composition: "model": "a+b" / "adapter": ["a", "b"] applies both in one forward, in that order, and
gives exactly what one adapter file holding both sets of interventions in that order gives."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server import adapter_file
from server.adapter_file import MAX_COMPOSED, AdapterError, Composite, ServedAdapter, build, composition
from server.interventions import Intervention
from server.model import ModelShape

DATA = Path(__file__).parent / "data" / "pyreft-types"
CASES = json.loads((DATA / "expected.json").read_text())["cases"]
SHAPE = ModelShape(model_type="llama", hidden_size=576, num_layers=30)
PROMPTS = [g["prompt_ids"] for g in CASES["loreft"]["generations"]]


def imported(name: str) -> adapter_file.Adapter:
    case = CASES[name]
    return adapter_file.import_pyreft(DATA / name, case["positions"], case["share_weights"], SHAPE, 64)


def moved(adapter: adapter_file.Adapter, layers: list[int]) -> adapter_file.Adapter:
    """The same interventions on other layers."""
    ivs = [Intervention(iv.type, layer, iv.rank, iv.tensors) for iv, layer in zip(adapter.interventions, layers,
                                                                                   strict=True)]
    return build(ivs, adapter.positions, adapter.share_weights, adapter.base, adapter.dtype)


def joined(a: adapter_file.Adapter, b: adapter_file.Adapter) -> adapter_file.Adapter:
    """One adapter file holding a's interventions, then b's (both use the same positions rule)."""
    assert (a.positions, a.share_weights) == (b.positions, b.share_weights)
    return build([*a.interventions, *b.interventions], a.positions, a.share_weights, a.base, a.dtype)


LORE = imported("loreft")  # layers 2, 7; f2+l2 shared
NODI = imported("nodireft")  # layers 3, 9; f2+l2 shared
NODI_SHARED = moved(NODI, [7, 2])  # on loreft's layers, the other way round
ADAPTERS = {
    "lore": LORE, "nodi": NODI, "nodi-shared": NODI_SHARED, "direft": imported("direft"),
    "lore-nodi": joined(LORE, NODI), "nodi-lore": joined(NODI, LORE), "lore-nodishared": joined(LORE, NODI_SHARED),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("compose")
    registry = root / "adapters"
    registry.mkdir()
    for name, adapter in ADAPTERS.items():
        (registry / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(adapter))
    srv = reft_server_factory(registry, root / "server.log", {"REFT_MAX_BATCH_SIZE": "32", "REFT_SCAN_INTERVAL": "0"})
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        yield c
    srv.stop()


def generate(client: httpx.Client, adapter, prompt: list[int], n: int = 16) -> list[int]:
    r = client.post("/generate", json={"adapter": adapter, "prompt": prompt, "max_new_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == adapter
    return r.json()["token_ids"]


def test_composite_lists_interventions_and_positions_in_order():
    composite = Composite((LORE, imported("direft")))
    assert [iv.layer for iv in composite.interventions] == [2, 7, 2]
    assert composite.locations(10) == [[0, 1, 8, 9], [0, 1, 8, 9], [0, 9]]  # each part keeps its own rule
    assert composite.layers == [2, 7] and composite.types == ["direft", "loreft"] and composite.max_rank == 4
    assert isinstance(composite, ServedAdapter) and isinstance(LORE, ServedAdapter)  # what the engine types against


def test_composition_names_and_limit():
    assert composition("a+b") == ["a", "b"] and composition(["a", "b"]) == ["a", "b"] and composition("a") == ["a"]
    with pytest.raises(AdapterError, match=f"at most {MAX_COMPOSED} adapters .* got {MAX_COMPOSED + 1}"):
        composition("+".join(["a"] * (MAX_COMPOSED + 1)))
    with pytest.raises(AdapterError, match="empty name"):
        composition("a++b")
    with pytest.raises(AdapterError, match="empty name"):
        composition([])


@pytest.mark.parametrize(("parts", "single"), [
    (["lore", "nodi"], "lore-nodi"),  # disjoint layers
    (["nodi", "lore"], "nodi-lore"),
    (["lore", "nodi-shared"], "lore-nodishared"),  # the same layers: applied one after the other
])
def test_composing_equals_one_file_holding_both(client, parts, single):
    for prompt in PROMPTS:
        want = generate(client, single, prompt)
        assert generate(client, parts, prompt) == want
        assert generate(client, "+".join(parts), prompt) == want


def test_openai_model_plus_syntax(client):
    r = client.post("/v1/completions", json={"model": "lore+nodi", "prompt": PROMPTS[1], "max_tokens": 16,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    ids = generate(client, "lore-nodi", PROMPTS[1])
    single = client.post("/v1/completions", json={"model": "lore-nodi", "prompt": PROMPTS[1], "max_tokens": 16,
                                                  "temperature": 0})
    assert r.json()["choices"][0]["text"] == single.json()["choices"][0]["text"] and ids


def test_composition_in_mixed_batches(client):
    jobs = [(a, p) for p in PROMPTS for a in (["lore", "nodi"], None, "lore", ["direft", "lore", "nodi-shared"],
                                               "nodi-lore", ["nodi", "lore"])]
    alone = [generate(client, a, p) for a, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: generate(client, *job), jobs))
    assert together == alone


def test_bad_compositions(client):
    r = client.post("/generate", json={"adapter": ["lore"] * (MAX_COMPOSED + 1), "prompt": "hi"})
    assert r.status_code == 400 and f"got {MAX_COMPOSED + 1}" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "lore+", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and "empty name" in r.json()["error"]["message"]
    r = client.post("/generate", json={"adapter": ["lore", "nope"], "prompt": "hi"})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
