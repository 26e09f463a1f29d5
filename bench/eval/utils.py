"""Prompt and metrics of the local lm-eval tasks in bench/eval, loaded by their YAML as `!function utils.NAME`."""

from __future__ import annotations

import re

# SmolLM2's default system prompt (chat_template.jinja adds it when a chat has none): the chat adapters
# were trained on prompts that carry it, so the tasks' prompts carry it too.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(doc: dict) -> str:
    """The question as one user turn in SmolLM2's chat template, ready for the assistant's answer.

    Literal text rather than lm-eval's --apply_chat_template, so the `hf` and `local-completions` models
    score exactly the same tokens and nobody has to remember the flag.
    """
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{doc['question']}<|im_end|>\n"
            "<|im_start|>assistant\n")


def gen_metrics(doc: dict, results: list[str]) -> dict[str, int]:
    """reft_gen's metrics: `caps` (more than 80% of the answer's letters are capitals, the `shout` rule of
    tests/test_example_adapters.py) and `correct` (one of the doc's answers appears as a word, any case)."""
    answer = results[0]
    letters = [c for c in answer if c.isalpha()]
    caps = bool(letters) and sum(c.isupper() for c in letters) > 0.8 * len(letters)
    correct = any(re.search(rf"\b{re.escape(a)}\b", answer.lower()) for a in doc["answers"])
    return {"caps": int(caps), "correct": int(correct)}
