"""This project's side of the comparison: the same recipe through server.train.Trainer; prints
per-epoch times and losses as one JSON line.

    PYTHONPATH=. .venv/bin/python adapters/compare/ours_side.py TRAIN.jsonl EPOCHS
"""

import json
import sys
import time

from server.model import load_base_model
from server.train import TrainConfig, Trainer, load_examples

data, epochs = sys.argv[1], int(sys.argv[2])
base = load_base_model(device="cpu", dtype="float32")
config = TrainConfig(kind="loreft", layers=(4, 10), positions="f2+l2", share_weights=True, rank=4, epochs=epochs,
                     lr=4e-3, batch_size=10, seed=0)
trainer = Trainer(base, load_examples(data, base), config)
times: list[float] = []
losses: list[float] = []
while not trainer.done:
    t = time.perf_counter()
    losses.append(trainer.step())
    times.append(time.perf_counter() - t)
print(json.dumps({"impl": "ours", "epoch_s": times, "losses": losses}))
