"""This project's side of the comparison: the emoji recipe through server.train.Trainer; prints
per-epoch times and losses as one JSON line, and with --held-out the greedy answers (prompt-only
intervention, 32 tokens) to the shared fixture's prompts that are not in the training data.

    PYTHONPATH=. .venv/bin/python adapters/compare/ours_side.py TRAIN.jsonl EPOCHS [--held-out EXPECTED.json]
"""

import argparse
import json
import time

import torch

from server.model import load_base_model
from server.reference import hooked, locations_index
from server.train import TrainConfig, Trainer, load_examples

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("epochs", type=int)
parser.add_argument("--held-out")
args = parser.parse_args()
base = load_base_model(device="cpu", dtype="float32")
config = TrainConfig(kind="loreft", layers=(4, 10), positions="f2+l2", share_weights=True, rank=4, epochs=args.epochs,
                     lr=4e-3, batch_size=10, seed=0)
trainer = Trainer(base, load_examples(args.data, base), config)
times: list[float] = []
losses: list[float] = []
while not trainer.done:
    t = time.perf_counter()
    losses.append(trainer.step())
    times.append(time.perf_counter() - t)
result = {"impl": "ours", "epoch_s": times, "losses": losses}


@torch.no_grad()
def greedy(prompt_ids: list[int], adapter, max_new: int = 32) -> list[int]:
    """Intervene on the prompt's forward only, then decode from the KV cache without hooks."""
    ids = torch.tensor([prompt_ids])
    where = locations_index([len(prompt_ids)], adapter.positions, len(adapter.interventions), adapter.share_weights,
                            base.device)
    with hooked(base.layers, adapter.interventions, where):
        out = base.model(input_ids=ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == trainer.pad:
            break
        out = base.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


if args.held_out:
    train_prompts = {tuple(e.prompt_ids) for e in trainer.examples}
    adapter = trainer.adapter()
    result["held_out"] = [
        {"question": g["question"], "answer": base.tokenizer.decode(greedy(g["prompt_ids"], adapter),
                                                                     skip_special_tokens=True)}
        for g in json.load(open(args.held_out))["emoji"]["generations"] if tuple(g["prompt_ids"]) not in train_prompts
    ]
print(json.dumps(result, ensure_ascii=False))
