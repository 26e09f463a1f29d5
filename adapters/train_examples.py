"""Re-train the shipped example adapters from their data files, reproducibly (fixed seeds).

    .venv/bin/python adapters/train_examples.py            # all of them
    .venv/bin/python adapters/train_examples.py pirate     # just one

Each adapter is written to adapters/<name>.safetensors (through a temporary file, so a
running server never sees half a file). Training is deterministic for a given torch build
and thread count; expect ~1-2 minutes per adapter on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from server import adapter_file  # noqa: E402
from server.model import load_base_model  # noqa: E402
from server.train import read_jsonl, train_adapter  # noqa: E402

# name -> train_adapter keyword arguments; the data is adapters/data/<name>.jsonl.
EXAMPLES: dict[str, dict] = {
    "pirate": dict(kind="loreft", layers=[4, 10], rank=4, positions="f2+l2", share_weights=True,
                   epochs=60, lr=4e-3, seed=0),
    "shout": dict(kind="loreft", layers=[4, 10], rank=4, positions="f2+l2", share_weights=True,
                  epochs=60, lr=4e-3, seed=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"adapters to train: {', '.join(EXAMPLES)} (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write <name>.safetensors into")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(EXAMPLES))
    if unknown:
        parser.error(f"unknown example adapters: {', '.join(unknown)} (known: {', '.join(EXAMPLES)})")
    base = load_base_model(device="cpu", dtype="float32")
    for name in args.names or list(EXAMPLES):
        examples = read_jsonl(HERE / "data" / f"{name}.jsonl")
        start = time.monotonic()
        adapter = train_adapter(base, examples, **EXAMPLES[name])
        target = args.out / f"{name}.safetensors"
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        adapter_file.save(adapter, tmp)
        tmp.replace(target)
        print(f"{name}: {len(examples)} examples, {time.monotonic() - start:.0f} s -> {target}")


if __name__ == "__main__":
    main()
