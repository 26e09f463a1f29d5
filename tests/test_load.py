"""The short version of the load test (`make load` runs the long one): a real server under locust.

50 random LoReFT adapters with Zipf popularity (some requests compose two), completions, chat and /generate,
streaming or not, with every sampling option the API accepts drawn per request (load_tests/workload.py), while
two admin users replace served adapters and upload and delete others. Much smaller than `make load` so it fits
a few minutes on an idle 2-core CPU: 16 inference users (not 64), prompts of 16-128 tokens and outputs of 1-32
(not 1,024 and 256), 60 s of load; requests in flight at the end are waited for, not abandoned, so a slow
(shared) machine makes the test longer rather than empty. Every answer is then replayed alone against the idle
server with the adapter version it was sent to (an answer that differs alone must hold token by token under a
plain forward of that version, up to float near-ties: load_tests/reference.py), and every acknowledged adapter
write is checked in the registry.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from load_tests import run as load
from load_tests.reference import Reference, Verdict, adjusted, sampling_params
from server.engine.sampling import Sampler, seeded_uniform


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

    # The plain forward that judges near-ties agrees with the server on the right adapter, not on another.
    reference = Reference(setup.model)
    right, other = setup.pool[0], setup.pool[1]
    with httpx.Client(base_url=server.url, timeout=600) as client:
        load.upload(client, "judged", right, None)
        for body in ({"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.95, "seed": 7}):
            body |= {"model": "judged", "prompt": list(range(100, 160)), "max_tokens": 24, "ignore_eos": True,
                     "return_token_ids": True}
            answer = client.post("/v1/completions", json=body).json()["choices"][0]
            params = sampling_params("completions", body, 24)
            assert reference.explain(answer["prompt_token_ids"], answer["token_ids"], params, right).explained
            assert reference.explain(answer["prompt_token_ids"], answer["token_ids"], params, other).wrong_step \
                is not None


def test_verifier_tells_near_ties_from_wrong_answers(monkeypatch):
    """Without a server: an answer equal alone matches; one that differs alone but holds under the plain forward
    is a float near-tie; one that does not is wrong, and so is one without token ids to check."""
    answers = {"a": "same", "b": "tie", "c": "wrong", "d": "no ids"}
    monkeypatch.setattr(load, "upload", lambda *args, **kwargs: {})
    monkeypatch.setattr(load, "wait_idle", lambda client: None)
    monkeypatch.setattr(load, "run_alone", lambda client, rec, ref: {"status": 200, "text": "same", "token_ids": [1]})

    class Judge:
        def explain(self, prompt, answer, params, adapter):
            assert prompt == [5, 6] and adapter == "f"
            return Verdict(len(answer), [1]) if answer == [2, 3] else Verdict(len(answer), [], 0)

    gens = [{"id": i, "status": 200, "endpoint": "completions", "stream": False, "adapter": "a00", "t_send": 1.0,
             "t_end": 2.0, "body": {"prompt": [5, 6], "temperature": 0.8, "seed": 1}, "text": text,
             "token_ids": {"same": [1], "tie": [2, 3], "wrong": [4], "no ids": []}[text]}
            for i, text in answers.items()]
    timeline = {"a00": [{"k": 0, "file": "f", "t_start": float("-inf"), "t_ack": float("-inf")}]}
    result = load.verify_answers(None, gens, timeline, None, budget_s=60, reference=Judge)
    assert result["verified"] == 4 and result["matched"] == 1
    assert [(t["id"], t["near_tie_steps"]) for t in result["near_ties"]] == [("b", [1])]
    assert sorted(w["id"] for w in result["wrong"]) == ["c", "d"]
    text = load.report({"figures": _figures(), "verification": result, "registry": _registry(), "config": _config(),
                        "failures": []})
    assert "NEAR-TIE b completions sampled a00 versions [0] (explained by 0), near-tie at token [1] of 2" in text
    assert "WRONG c completions sampled a00 versions [0], token 0 of 1 not the candidate's pick" in text


class Crafted(Reference):
    """The judge on logits given by hand, without a model."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = torch.tensor(rows)

    def logits(self, prompt, answer, adapter):
        return self.rows[: len(answer)]


def test_reference_accepts_greedy_picks_and_near_ties_and_refuses_other_tokens():
    params = sampling_params("generate", {}, 2)
    close = [0.0, 0.0, 0.0, 9.0, 0.0, 9.0 - 5e-4, -30.0, 0.0]  # tokens 3 and 5 within the tolerance, 6 unlikely
    apart = [0.0, 0.0, 0.0, 9.0, 0.0, 9.0 - 5e-3, -30.0, 0.0]
    assert Crafted([close, close]).explain([1], [3, 3], params, None) == Verdict(2, [], None)
    assert Crafted([close, close]).explain([1], [3, 5], params, None) == Verdict(2, [1], None)
    assert Crafted([apart]).explain([1], [5], params, None) == Verdict(1, [], 0)
    assert Crafted([close, close]).explain([1], [3, 6], params, None) == Verdict(2, [], 1)


def uniform_between(lo: float, hi: float) -> int:
    """A seed whose first draw lies in (lo, hi)."""
    return next(s for s in range(100_000) if lo < seeded_uniform(s, 0) < hi)


def test_reference_accepts_a_seeded_draw_beside_a_boundary_of_its_distribution():
    """The draw's uniform lies 2e-5 inside token 3's share (token 5 has the rest): token 5 is a near-tie.
    5e-4 inside, it is not."""
    seed, temperature = 11, 0.8
    u = seeded_uniform(seed, 0)
    params = sampling_params("completions", {"temperature": temperature, "seed": seed}, 1)

    def judge(share: float) -> Crafted:
        row = [-1e4] * 8
        row[3], row[5] = temperature * math.log(share / (1 - share)), 0.0
        return Crafted([row])

    assert judge(u + 2e-5).explain([1], [3], params, None) == Verdict(1, [], None)
    assert judge(u + 2e-5).explain([1], [5], params, None) == Verdict(1, [0], None)
    assert judge(u + 5e-4).explain([1], [5], params, None) == Verdict(1, [], 0)
    assert judge(u + 2e-5).explain([1], [6], params, None) == Verdict(1, [], 0)


def test_reference_accepts_a_draw_that_a_top_p_cut_one_token_away_would_give():
    """Top-p 0.9 keeps tokens 1, 4 and 6 (6 by a margin of mass); the draw falls where token 4 lies with 6 kept,
    and where token 1 lies without it. Token 1 is a near-tie when the margin is 2e-5, not when it is 5e-4."""
    seed = uniform_between(0.52, 0.55)
    params = sampling_params("completions", {"temperature": 1.0, "top_p": 0.9, "seed": seed}, 1)

    def judge(margin: float) -> Crafted:
        row = [-1e4] * 8
        row[1], row[4], row[6] = math.log(0.5), math.log(0.4 - margin), math.log(0.1 + margin)
        return Crafted([row])

    assert judge(2e-5).explain([1], [4], params, None) == Verdict(1, [], None)
    assert judge(2e-5).explain([1], [1], params, None) == Verdict(1, [0], None)
    assert judge(5e-4).explain([1], [1], params, None) == Verdict(1, [], 0)
    assert judge(2e-5).explain([1], [6], params, None) == Verdict(1, [], 0)


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


def test_the_judge_adjusts_scores_as_the_sampler_does():
    """reference.adjusted, rule by rule in Python, picks what the Sampler picks under bias and penalties."""
    vocab, prompt, gen = 40, [1, 2, 3, 2], torch.Generator().manual_seed(3)
    bodies = [{"logit_bias": {"5": 3.0, "7": -100.0}}, {"repetition_penalty": 1.5}, {"repetition_penalty": 0.7},
              {"presence_penalty": 1.5, "frequency_penalty": 0.5}, {"frequency_penalty": -0.5},
              {"logit_bias": {"9": 2.0}, "repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.6}]
    for body in bodies:
        params = sampling_params("completions", {"temperature": 0.0, **body}, 25)
        sampler = Sampler(1, vocab, "cpu")
        sampler.add(0, params, prompt)
        generated: list[int] = []
        for _ in range(25):
            row = torch.randn(vocab, generator=gen).clamp(-1, 1)  # close logits: the penalties move the pick
            token = sampler(row[None], torch.tensor([0])).token_ids[0]
            assert int(adjusted(row, prompt, generated, params).argmax()) == token, (body, generated)
            generated.append(token)
        assert len(set(generated)) > 1 or "logit_bias" in body, body


def test_streamed_choices_are_kept_apart_with_their_logprob_widths():
    """Chunks of n choices interleave in a stream; each choice's text, ids and logprob widths are its own."""
    events = [
        {"choices": [{"index": 1, "text": "b", "token_ids": [7], "logprobs": {"top_logprobs": [{"b": -1.0}]}}],
         "prompt_token_ids": [1, 2]},
        {"choices": [{"index": 0, "text": "a", "token_ids": [5], "logprobs": {"top_logprobs": [{"a": -1, "c": -2}]}}]},
        {"choices": [{"index": 1, "text": "d", "token_ids": [8], "logprobs": {"top_logprobs": [{"d": -0.5}]}}]},
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    rec: dict = {}
    load.parse_stream([f"data: {json.dumps(e)}" for e in events] + ["data: [DONE]"], "completions", rec)
    assert rec["choices"] == [{"text": "a", "token_ids": [5], "widths": [2]},
                              {"text": "bd", "token_ids": [7, 8], "widths": [1, 1]}]
    assert (rec["text"], rec["token_ids"], rec["prompt_ids"], rec["done"]) == ("a", [5], [1, 2], True)
    whole: dict = {}
    load.parse_whole({"choices": [{"index": 0, "message": {"content": "x"}, "token_ids": [4],
                                   "logprobs": {"content": [{"top_logprobs": [{}, {}, {}]}]}}]}, "chat", whole)
    assert whole["choices"] == [{"text": "x", "token_ids": [4], "widths": [3]}]
