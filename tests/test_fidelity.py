"""Fidelity to real pyreft for every intervention type: adapters saved by pyreft 0.1.0 with random
weights (tests/data/pyreft-types, written by tests/fixtures/make_pyreft_fixtures.py), imported
with the project's importer and served; every greedy token must be pyreft's, alone and mixed in
one batch with the other types and the base model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server import adapter_file
from server.model import ModelShape

DATA = Path(__file__).parent / "data" / "pyreft-types"
EXPECTED = json.loads((DATA / "expected.json").read_text())
CASES = EXPECTED["cases"]
MAX_NEW = EXPECTED["max_new_tokens"]
SHAPE = ModelShape(model_type="llama", hidden_size=576, num_layers=30)
EOS = 2


def imported(name: str) -> adapter_file.Adapter:
    case = CASES[name]
    return adapter_file.import_pyreft(DATA / name, case["positions"], case["share_weights"], SHAPE, 64)


@pytest.fixture(scope="module")
def client(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("fidelity")
    registry = root / "adapters"
    registry.mkdir()
    for name in CASES:
        (registry / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(imported(name)))
    srv = reft_server_factory(registry, root / "server.log", {"REFT_MAX_BATCH_SIZE": "32", "REFT_SCAN_INTERVAL": "0"})
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        yield c
    srv.stop()


def generate(client: httpx.Client, adapter: str | None, prompt_ids: list[int]) -> list[int]:
    r = client.post("/generate", json={"adapter": adapter, "prompt": prompt_ids, "max_new_tokens": MAX_NEW,
                                       "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = body["token_ids"]
    # pyreft's ids end with the EOS it stopped at
    return ids + [EOS] if body["finish_reason"] == "stop" and (not ids or ids[-1] != EOS) else ids


def test_fixtures_cover_every_type_and_untied_weights():
    assert {c["type"] for c in CASES.values()} == {"loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"}
    untied = [c for c in CASES.values() if not c["share_weights"] and "+" in c["positions"]]
    assert untied and all(len(c["layers"]) == 4 for c in untied)


@pytest.mark.parametrize("name", list(CASES))
def test_import_reads_what_pyreft_saved(name):
    case, adapter = CASES[name], imported(name)
    assert [iv.layer for iv in adapter.interventions] == case["layers"]
    assert adapter.types == [case["type"]] and adapter.max_rank == case["rank"]
    for g in case["generations"]:  # every fixture adapter changes some continuation: the check can fail
        if g["completion_ids"] != g["base_completion_ids"]:
            break
    else:
        pytest.fail(f"{name}: pyreft's output equals the base model's on every prompt")


@pytest.mark.parametrize("name", list(CASES))
def test_served_alone_matches_pyreft_token_for_token(client, name):
    for g in CASES[name]["generations"]:
        assert generate(client, name, g["prompt_ids"]) == g["completion_ids"], (name, g["prompt"])


def test_all_types_in_one_mixed_batch_match_pyreft(client):
    jobs = [(name, g["prompt_ids"], g["completion_ids"]) for name, case in CASES.items() for g in case["generations"]]
    first = next(iter(CASES.values()))["generations"]
    jobs += [(None, g["prompt_ids"], g["base_completion_ids"]) for g in first]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: generate(client, job[0], job[1]), jobs))
    for (name, _, want), ids in zip(jobs, got, strict=True):
        assert ids == want, name
