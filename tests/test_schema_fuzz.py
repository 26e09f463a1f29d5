"""Property-based fuzzing of every endpoint from the server's own /openapi.json (schemathesis).

Whatever schemathesis generates, the server must answer without a 5xx, and every error must
come in the contract's JSON shape. Generation is capped (REFT_MAX_NEW_TOKENS, prompt limits)
so each generated completion is cheap on a 2-core CPU.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import REPO


@pytest.fixture(scope="module")
def fuzz_schema(reft_server_factory, tmp_path_factory):
    registry = tmp_path_factory.mktemp("fuzz-registry")
    shutil.copy(REPO / "adapters" / "emoji.safetensors", registry / "emoji.safetensors")
    server = reft_server_factory(
        registry, tmp_path_factory.mktemp("fuzz-log") / "server.log",
        env={"REFT_MAX_NEW_TOKENS": "4", "REFT_MAX_PROMPT_TOKENS": "256", "REFT_SCAN_INTERVAL": "0",
             "REFT_MAX_ADAPTER_BYTES": "262144"},
    )
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


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
