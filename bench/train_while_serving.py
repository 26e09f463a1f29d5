"""Serving latency while a training job runs on the same server (POST /v1/adapters/train).

    .venv/bin/python bench/train_while_serving.py [--data ../shared/fixtures/pyreft-emoji/train.jsonl]

Streams the same base-model request (64-token prompt, 48 new tokens) alone, then while a job
trains on DATA (pyreft's emoji recipe: batch 10, one step per epoch), and prints the median and
the longest gap between two streamed tokens of each run, and the job's own time per step. The
engine runs one training step after each decode step, so the longest gap while training is
about one decode step plus one training step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import Load, ServerProcess, random_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "fixtures" / "pyreft-emoji" / "train.jsonl")
    p.add_argument("--epochs", type=int, default=60)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    prompt = random_prompts(1, 64, seed=31)[0]
    with tempfile.TemporaryDirectory(prefix="reft-train-bench-") as tmp:
        server = ServerProcess(Path(tmp) / "adapters", Path(tmp) / "server.log")
        server.start()
        load = Load(server.url, concurrency=4)
        try:
            load.token_times(prompt, 8)  # warm the shape
            alone = gaps(load.token_times(prompt, 48))
            with httpx.Client(base_url=server.url, timeout=120) as client:
                r = client.post("/v1/adapters/train", json={"name": "bench-emoji", "data": rows, "epochs": args.epochs,
                                                            "batch_size": 10})
                r.raise_for_status()
                job_id = r.json()["id"]
                while client.get(f"/v1/adapters/train/{job_id}").json()["step"] < 2:
                    time.sleep(0.05)
                job_started = time.perf_counter()
                step_started = client.get(f"/v1/adapters/train/{job_id}").json()["step"]
                training = gaps(load.token_times(prompt, 48))
                job = client.get(f"/v1/adapters/train/{job_id}").json()
                per_step = (time.perf_counter() - job_started) / max(1, job["step"] - step_started)
                client.delete(f"/v1/adapters/train/{job_id}")
        finally:
            load.close()
            server.stop()
    for name, values in (("alone", alone), ("training", training)):
        print(f"TOKEN_GAP_{name.upper()}_MS median {1000 * statistics.median(values):.0f} "
              f"max {1000 * max(values):.0f}")
    print(f"TRAIN_STEP_WHILE_SERVING_S {per_step:.2f} (job {job['status']} at step {job['step']}, loss {job['loss']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
