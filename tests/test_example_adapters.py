"""The example adapters in adapters/ do what adapters/README.md says, on questions none of them was
trained on, measured against the base model's answers to the same questions through the server."""

from __future__ import annotations

import json
import shutil
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
HELD_OUT = [
    "What is the capital of Italy?",
    "How do plants grow?",
    "Tell me about dogs.",
    "What is the tallest mountain?",
    "Describe the ocean.",
    "What is 5 times 3?",
]
PIRATE_WORDS = ("arr", "matey", "ahoy", "ye ", " be ", "hearty", "yarr", "shiver", "me timbers", "o' ")


def upper_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def has_emoji(text: str) -> bool:
    return any(unicodedata.category(c) == "So" and ord(c) > 0x2000 for c in text)


def is_pirate(text: str) -> bool:
    return any(w in text.lower() for w in PIRATE_WORDS)


# adapter -> the rule its answers must meet (and the base model's must not)
RULES = {
    "pirate": is_pirate,
    "shout": lambda text: upper_ratio(text) > 0.8,
    "cheer": has_emoji,
    "emoji": has_emoji,
}
# pyreft's emoji adapter was trained on templated user turns without a system prompt, so it is
# asked that way through /v1/completions; the others through /v1/chat/completions.
TEMPLATED = {"emoji"}


@pytest.fixture(scope="module")
def answers(tmp_path_factory, reft_server_factory) -> dict[tuple[str | None, bool], list[str]]:
    root = tmp_path_factory.mktemp("examples")
    registry = root / "adapters"
    registry.mkdir()
    for name in RULES:
        shutil.copy(ADAPTERS / f"{name}.safetensors", registry)
    srv = reft_server_factory(registry, root / "server.log", {"REFT_MAX_BATCH_SIZE": "32", "REFT_SCAN_INTERVAL": "0"})

    def ask(job: tuple[str | None, bool, str]) -> str:
        model, templated, question = job
        body = {"model": model or "base", "temperature": 0, "max_tokens": 40}
        if templated:
            prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            r = client.post("/v1/completions", json={**body, "prompt": prompt})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    runs = [(None, False), (None, True), *((name, name in TEMPLATED) for name in RULES)]
    jobs = [(model, templated, q) for model, templated in runs for q in HELD_OUT]
    with httpx.Client(base_url=srv.url, timeout=300) as client, ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(ask, jobs))
    srv.stop()
    out: dict[tuple[str | None, bool], list[str]] = {}
    for (model, templated, _), text in zip(jobs, texts, strict=True):
        out.setdefault((model, templated), []).append(text)
    return out


def test_every_example_adapter_has_its_data_beside_it():
    for name in ("pirate", "shout", "cheer"):
        lines = (ADAPTERS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) >= 10 and all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)
        questions = {json.loads(line)["messages"][0]["content"] for line in lines}
        assert not questions & set(HELD_OUT)  # the test questions are held out


@pytest.mark.parametrize("name", list(RULES))
def test_adapter_changes_held_out_answers_by_its_rule(answers, name):
    rule, templated = RULES[name], name in TEMPLATED
    mine, base = answers[(name, templated)], answers[(None, templated)]
    assert sum(map(rule, mine)) >= len(HELD_OUT) - 1, (name, mine)
    assert sum(map(rule, base)) <= 1, base
