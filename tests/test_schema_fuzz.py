"""Fuzzing: every endpoint from the server's own /openapi.json (schemathesis, stateless and along its
links), and hypothesis over hostile inputs: adapter files (random safetensors headers, shapes,
dtypes, metadata JSON) and prompts (random unicode, token ids out of range).

Whatever schemathesis generates, the server must answer without a 5xx, and every error must
come in the contract's JSON shape. The stateful test follows the schema's OpenAPI links (an
uploaded adapter's name into get, delete and completions). Generation is capped (REFT_MAX_NEW_TOKENS, prompt limits)
so each generated completion is cheap on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import adapter_file
from server.adapter_file import AdapterError
from server.model import ModelShape
from tests.conftest import REPO


@pytest.fixture(scope="module")
def fuzz_server(reft_server_factory, tmp_path_factory):
    registry = tmp_path_factory.mktemp("fuzz-registry")
    shutil.copy(REPO / "adapters" / "emoji.safetensors", registry / "emoji.safetensors")
    tmpdir = tmp_path_factory.mktemp("fuzz-tmp")
    server = reft_server_factory(
        registry, tmp_path_factory.mktemp("fuzz-log") / "server.log",
        env={"REFT_MAX_NEW_TOKENS": "4", "REFT_MAX_PROMPT_TOKENS": "256", "REFT_SCAN_INTERVAL": "0",
             "REFT_MAX_ADAPTER_BYTES": "262144", "TMPDIR": str(tmpdir)},
    )
    server.tmpdir = tmpdir
    return server


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def contract_error(response) -> str | None:
    """What is wrong with a response under the contract (a 5xx, or an error not in its shape); None if fine."""
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        if set(body) != {"error"} or not {"message", "type", "code"} <= set(body["error"]):
            return f"{response.status_code} not in the error shape: {response.text[:300]}"
    return None


def test_no_server_errors(fuzz_schema):
    """Every operation, a dozen generated cases each: no 5xx, errors in the contract's shape."""
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    failures: list[str] = []
    seen: list[tuple[str, int]] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case) -> None:
            response = case.call(timeout=60)
            seen.append((f"{case.method} {case.path}", response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, body
                assert {"message", "type", "code"} <= set(body["error"]), body

        check()
    assert not failures, "\n".join(failures)
    assert len(seen) >= 5 * len(operations), f"too few cases were generated: {len(seen)}"
    assert any(status == 200 for _, status in seen), "no generated case was accepted"


def test_stateful_links(fuzz_schema):
    """Sequences that follow the links: upload → get / delete / complete with the uploaded name."""
    adapter = (REPO / "adapters" / "emoji.safetensors").read_bytes()
    base_url = fuzz_schema.get_base_url()
    failures: list[str] = []
    followed: list[str] = []

    class Machine(fuzz_schema.as_state_machine()):
        def before_call(self, case) -> None:
            # uploads whose generated name has an even length carry a real adapter under a fresh valid name,
            # so the links have a target (the choice depends on the drawn case only, as hypothesis needs)
            if case.method == "POST" and case.path == "/v1/adapters" and isinstance(case.body, dict):
                if len(str(case.body.get("name", ""))) % 2 == 0:
                    case.body = {**case.body, "name": f"fz-{uuid.uuid4().hex[:12]}", "file": adapter}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            followed.append(f"{case.method} {case.path} {response.status_code}")
            problem = contract_error(response)
            if problem:
                failures.append(f"{case.method} {case.path}: {problem}")

        def teardown(self) -> None:
            """Every sequence starts from the same registry: only emoji."""
            with httpx.Client(base_url=base_url, timeout=60) as c:
                for entry in c.get("/v1/adapters", params={"limit": 1000}).json()["data"]:
                    if entry["name"] != "emoji":
                        c.delete(f"/v1/adapters/{entry['name']}")
                if c.get("/v1/adapters/emoji").status_code == 404:
                    c.post("/v1/adapters", data={"name": "emoji"}, files={"file": ("emoji.safetensors", adapter)})

    Machine.run(settings=settings(max_examples=25, stateful_step_count=4, deadline=None, derandomize=True,
                                  suppress_health_check=list(HealthCheck), database=None))
    assert not failures, "\n".join(failures)
    assert any(f.startswith("POST /v1/adapters 201") for f in followed), followed
    linked = [f for f in followed if f.startswith(("GET /v1/adapters/{name}", "DELETE /v1/adapters/{name}"))]
    assert any(f.endswith((" 200", " 204")) for f in linked), followed


# ---- hypothesis over hostile inputs ---------------------------------------------------------------

SHAPE = ModelShape("llama", 576, 30)
EMOJI = (REPO / "adapters" / "emoji.safetensors").read_bytes()
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", ""]
VOCAB = 49152
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def emoji_parts() -> tuple[dict, dict]:
    """The real adapter's header (tensor entries) and its metadata document."""
    (length,) = struct.unpack("<Q", EMOJI[:8])
    header = json.loads(EMOJI[8:8 + length])
    meta = json.loads(header.pop("__metadata__")[adapter_file.METADATA_KEY])
    return header, meta


HEADER, META = emoji_parts()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def safetensors_files(draw) -> bytes:
    """A file with a drawn header: tensor entries (dtype, shape, offsets) and metadata, then drawn data."""
    tensors = {}
    for name in draw(st.lists(st.sampled_from(list(HEADER)) | st.text(max_size=30), max_size=6, unique=True)):
        shape = draw(st.lists(st.integers(0, 700), max_size=3))
        start = draw(st.integers(0, 4096))
        tensors[name] = {"dtype": draw(st.sampled_from(DTYPES)), "shape": shape,
                         "data_offsets": [start, start + draw(st.integers(-8, 4096))]}
    meta = dict(META)
    for key in draw(st.lists(st.sampled_from([*META, "extra"]), max_size=3, unique=True)):
        meta[key] = draw(json_values)
    if draw(st.booleans()):
        meta["interventions"] = [
            {"type": draw(st.sampled_from(["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft", "x"])),
             "layer": draw(st.integers(-3, 40)), "rank": draw(st.integers(-1, 100)),
             "component": draw(st.sampled_from(["block_output", "attention_output"]))}
            for _ in range(draw(st.integers(0, 3)))
        ]
    metadata = json.dumps(meta) if draw(st.integers(0, 9)) else draw(st.text(max_size=50))
    header = json.dumps({**tensors, "__metadata__": {adapter_file.METADATA_KEY: metadata}}).encode()
    declared = len(header) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", declared) + header + draw(st.binary(max_size=4096))


@st.composite
def mutated_emoji(draw) -> bytes:
    """The real adapter with a few bytes flipped, or cut short."""
    data = bytearray(EMOJI)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


adapter_files = safetensors_files() | mutated_emoji() | st.binary(max_size=512)


@pytest.mark.slow
@settings(FUZZ, max_examples=400)
@given(data=adapter_files)
def test_parsing_accepts_or_refuses_with_adapter_error(data):
    try:
        adapter = adapter_file.loads(data, SHAPE, 64)
    except AdapterError:
        return
    assert adapter.interventions  # accepted: a usable adapter


def snapshot(server) -> list[tuple[str, int]]:
    registry = Path(server.registry)
    files = sorted((p.name, p.stat().st_size) for p in registry.iterdir() if not p.name.startswith(".registry"))
    spooled = [os.readlink(fd) for fd in Path(f"/proc/{server.proc.pid}/fd").iterdir()
               if os.path.exists(fd) and os.readlink(fd).startswith(str(server.tmpdir))]
    return files + [(name, 0) for name in sorted(spooled) + sorted(os.listdir(server.tmpdir))]


@settings(FUZZ, max_examples=40)
@given(data=adapter_files, name=st.sampled_from(["fz", "fz-2", ".hidden", "a/b", "é", "x" * 65]))
def test_upload_of_hostile_files_is_refused_cleanly(fuzz_server, data, name):
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        before = snapshot(fuzz_server)
        r = c.post("/v1/adapters", data={"name": name}, files={"file": ("a.safetensors", data)})
        assert contract_error(r) is None, contract_error(r)
        if r.status_code == 201:
            assert c.delete(f"/v1/adapters/{name}").status_code == 204
        else:
            assert r.status_code in (400, 409, 413, 422), r.text
        assert snapshot(fuzz_server) == before


prompts = st.text(st.characters(exclude_categories=()), max_size=80) | st.lists(
    st.integers(-2**63, 2**63 - 1) | st.integers(VOCAB - 2, VOCAB + 2), min_size=0, max_size=12)


@settings(FUZZ, max_examples=24)
@given(prompt=prompts, endpoint=st.sampled_from(["completions", "chat", "generate"]))
def test_hostile_prompts_never_fail_the_server(fuzz_server, prompt, endpoint):
    path, body = {
        "completions": ("/v1/completions", {"model": "emoji", "prompt": prompt, "max_tokens": 1}),
        "chat": ("/v1/chat/completions", {"model": "emoji", "max_tokens": 1,
                                          "messages": [{"role": "user", "content": prompt}]}),
        "generate": ("/generate", {"adapter": "emoji", "prompt": prompt, "max_new_tokens": 1}),
    }[endpoint]
    payload = json.dumps(body)  # lone surrogates travel as \ud800 escapes, as a hostile client may send them
    r = httpx.post(fuzz_server.url + path, content=payload, headers={"content-type": "application/json"}, timeout=120)
    assert contract_error(r) is None, (prompt, contract_error(r))
    assert r.status_code in (200, 400, 413, 422, 429), (prompt, r.status_code, r.text)


def test_lone_surrogates_are_400(fuzz_server):
    chat = '{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}'
    cases = (("/v1/completions", '{"model": "emoji", "prompt": "a\\ud800b", "max_tokens": 1}'),
             ("/generate", '{"adapter": null, "prompt": "\\udfff", "max_new_tokens": 1}'),
             ("/v1/chat/completions", chat))
    for path, body in cases:
        r = httpx.post(fuzz_server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"], (path, r.text)
