"""The short version of the load test (`make load` runs the long one): a real server under locust.

50 random LoReFT adapters with Zipf popularity, completions, chat and /generate, streaming or not, while two
admin users replace served adapters and upload and delete others. Much smaller than `make load` so it fits
a few minutes on an idle 2-core CPU: 16 inference users (not 64), prompts of 16-128 tokens and outputs of 1-32
(not 1,024 and 256), 60 s of load; requests in flight at the end are waited for, not abandoned, so a slow
(shared) machine makes the test longer rather than empty. Every answer is then replayed alone against the idle
server with the adapter version it was sent to (an answer that differs alone must be reproduced beside other
requests: a float near-tie, see load_tests/run.py `run_beside`), and every acknowledged adapter write is checked in
the registry.
"""

from __future__ import annotations

import httpx
import pytest

from load_tests import run as load


@pytest.mark.timeout(1200)
def test_load_short(tmp_path, reft_server_factory):
    setup = load.prepare(tmp_path, n_adapters=50, n_pool=40, seed=1)
    server = reft_server_factory(setup.registry, tmp_path / "server.log")
    result = load.run(server.url, setup, users=16, admin_users=2, seconds=60, prompt_tokens=(16, 128),
                      output_tokens=(1, 32), server_pid=server.proc.pid, verify_seconds=600, stop_timeout=300,
                      admin_wait=(1.0, 3.0), seed=1)
    print(load.report(result))
    figures, verification, registry = result["figures"], result["verification"], result["registry"]
    assert figures["answered"] >= 5, figures
    assert figures["server_errors"] == 0 and figures["admin_errors"] == 0, figures["errors_by_status"]
    assert sum(n for op, n in figures["adapter_writes"].items() if op.startswith("replace 201")) >= 3, figures
    assert verification["verified"] == verification["answered"], "every answer must be replayed alone"
    assert verification["wrong"] == [], verification["wrong"]
    assert verification["replay_errors"] == 0
    assert verification["replaced_mid_flight_ok"] == verification["replaced_mid_flight"]
    assert not (registry["lost"] or registry["wrong_bytes"] or registry["resurrected"]), registry
    assert figures["rss_mib"]["kv_pool_end"] > 0, "the KV pool's mappings must be found in the server's smaps"
    assert result["failures"] == []
    # The near-tie replay itself works: the request answers while other requests decode beside it.
    rec = {"endpoint": "completions", "stream": False, "body": {"prompt": list(range(100, 140)), "max_tokens": 8,
                                                                "temperature": 0.0}}
    with httpx.Client(base_url=server.url, timeout=600) as client:
        beside = load.run_beside(client, rec, setup.adapters[0], 3, seed=0)
    assert beside["status"] == 200 and beside["text"], beside


def test_verifier_tells_near_ties_from_wrong_answers(monkeypatch):
    """Without a server: an answer equal alone matches; one reproduced only beside other requests is a float
    near-tie; one that no replay reproduces is wrong."""
    answers = {"a": "same", "b": "tie", "c": "wrong"}
    monkeypatch.setattr(load, "upload", lambda *args, **kwargs: {})
    monkeypatch.setattr(load, "wait_idle", lambda client: None)
    monkeypatch.setattr(load, "run_alone", lambda client, rec, ref: {"status": 200, "text": "same"})
    beside_calls = []

    def beside(client, rec, ref, others, seed):
        beside_calls.append((rec["id"], others))
        return {"status": 200, "text": "tie" if others == 3 else "same"}

    monkeypatch.setattr(load, "run_beside", beside)
    gens = [{"id": i, "status": 200, "endpoint": "completions", "stream": False, "adapter": "a00", "t_send": 1.0,
             "t_end": 2.0, "body": {"temperature": 0.8}, "text": text} for i, text in answers.items()]
    timeline = {"a00": [{"k": 0, "file": "f", "t_start": float("-inf"), "t_ack": float("-inf")}]}
    result = load.verify_answers(None, gens, timeline, None, budget_s=60)
    assert result["verified"] == 3 and result["matched"] == 1
    assert [(t["id"], t["beside"]) for t in result["near_ties"]] == [("b", 3)]
    assert [w["id"] for w in result["wrong"]] == ["c"]
    assert {o for i, o in beside_calls if i == "c"} == set(load.BESIDE)  # every batch size was tried
    assert "NEAR-TIE b" in load.report({"figures": _figures(), "verification": result, "registry": _registry(),
                                        "config": _config(), "failures": []})


def _figures() -> dict:
    pct = {"p50": 1, "p95": 1, "p99": 1}
    return {"seconds": 1, "answered": 3, "requests": 3, "requests_per_s": 1, "output_tokens_per_s": 1,
            "prompt_tokens_per_s": 1, "answered_by_endpoint": {}, "latency_s": pct, "ttft_s": pct,
            "errors_by_status": {}, "adapter_writes": {}}


def _registry() -> dict:
    return {"checked": 0, "lost": [], "wrong_bytes": [], "resurrected": []}


def _config() -> dict:
    return {"users": 1, "admin_users": 0, "adapters": 1, "zipf_s": 1.0, "prompt_tokens": [1, 1],
            "output_tokens": [1, 1]}
