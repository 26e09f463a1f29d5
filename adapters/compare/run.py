"""Time pyreft and this project's trainer on the shared emoji recipe, alternating runs (the machine is
shared), and print the median seconds per epoch of each and their ratio.

    PYTHONPATH=. .venv/bin/python adapters/compare/run.py --pyreft-python /tmp/pyreft-venv/bin/python \\
        --hf-dir /tmp/smollm2-hf --data ../shared/fixtures/pyreft-emoji/train.jsonl --epochs 8 --rounds 3
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser()
parser.add_argument("--pyreft-python", required=True)
parser.add_argument("--hf-dir", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
commands = {
    "pyreft": [args.pyreft_python, str(HERE / "pyreft_side.py"), args.hf_dir, args.data, str(args.epochs)],
    "ours": [sys.executable, str(HERE / "ours_side.py"), args.data, str(args.epochs)],
}
epochs: dict[str, list[float]] = {"pyreft": [], "ours": []}
for r in range(args.rounds):
    for impl in (("pyreft", "ours") if r % 2 == 0 else ("ours", "pyreft")):
        out = subprocess.run(commands[impl], capture_output=True, text=True, check=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        epochs[impl] += run["epoch_s"][1:]  # the first epoch warms up allocators and thread pools
        print(json.dumps({"round": r, **run}), flush=True)
medians = {impl: statistics.median(v) for impl, v in epochs.items()}
print(json.dumps({"median_epoch_s": medians, "ours_over_pyreft": medians["ours"] / medians["pyreft"]}))
