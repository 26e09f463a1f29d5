"""Serving latency while a training job runs on the same server (POST /v1/adapters/train).

    .venv/bin/python bench/train_while_serving.py [--data ../shared/fixtures/pyreft-emoji/train.jsonl]
        [--blocks 5] [--repeat 1] [--budget-ms MS]

Streams the same base-model request (64-token prompt, 48 new tokens) in blocks that alternate:
alone, then while a job trains on DATA (pyreft's emoji recipe: one step per epoch of the whole
data; `--repeat 10` makes a batch of 100 examples). Each block's median gap between two streamed
tokens is taken; the figures are the medians over blocks, side by side from one server, and the
ratio training/alone is checked against 3x (PASS/FAIL). Also printed: the longest gap of each
kind and the job's time per optimisation step while serving. The engine gives training
REFT_TRAIN_BUDGET_MS per iteration, so a gap while training is about one decode step plus that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import Load, ServerProcess, random_prompts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LIMIT = 3.0  # the most a stream's median token gap may grow while a job trains


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/adapters/train/{job_id}").json())["status"] not in statuses:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} is still {job['status']} after {timeout} s")
        time.sleep(0.05)
    return job


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "fixtures" / "pyreft-emoji" / "train.jsonl")
    p.add_argument("--blocks", type=int, default=5, help="alone/training pairs of streams")
    p.add_argument("--repeat", type=int, default=1, help="copies of the data in the job (one batch holds them all)")
    p.add_argument("--budget-ms", type=float, default=None, help="REFT_TRAIN_BUDGET_MS (default: the server's)")
    args = p.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()] * args.repeat
    prompt = random_prompts(1, 64, seed=31)[0]
    env = {"REFT_TRAIN_BUDGET_MS": str(args.budget_ms)} if args.budget_ms else {}
    alone: list[list[float]] = []
    training: list[list[float]] = []
    per_step: list[float] = []
    with tempfile.TemporaryDirectory(prefix="reft-train-bench-") as tmp:
        server = ServerProcess(Path(tmp) / "adapters", Path(tmp) / "server.log", env=env)
        server.start()
        load = Load(server.url, concurrency=4)
        try:
            load.token_times(prompt, 8)  # warm the shape
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for _ in range(args.blocks):
                    alone.append(gaps(load.token_times(prompt, 48)))
                    r = client.post("/v1/adapters/train", json={"name": "bench-emoji", "data": rows, "epochs": 60,
                                                                "batch_size": len(rows)})
                    r.raise_for_status()
                    job_id = r.json()["id"]
                    wait_status(client, job_id, {"running"})
                    started, step = time.perf_counter(), client.get(f"/v1/adapters/train/{job_id}").json()["step"]
                    training.append(gaps(load.token_times(prompt, 48)))
                    job = client.get(f"/v1/adapters/train/{job_id}").json()
                    if job["step"] > step:
                        per_step.append((time.perf_counter() - started) / (job["step"] - step))
                    client.delete(f"/v1/adapters/train/{job_id}")
                    wait_status(client, job_id, {"cancelled", "succeeded", "failed", "conflict"})
        finally:
            load.close()
            server.stop()
    print(f"DATE {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  CPU {cpu_model()}  blocks {args.blocks}  "
          f"examples per batch {len(rows)}  budget {args.budget_ms or 'default'} ms")
    medians = {}
    for name, runs in (("alone", alone), ("training", training)):
        block = [statistics.median(g) for g in runs]
        medians[name] = statistics.median(block)
        print(f"TOKEN_GAP_{name.upper()}_MS median {1000 * medians[name]:.0f} (blocks: "
              f"{', '.join(f'{1000 * m:.0f}' for m in block)}) max {1000 * max(max(g) for g in runs):.0f}")
    ratio = medians["training"] / medians["alone"]
    print(f"RATIO {ratio:.2f} (limit {LIMIT:.0f}x): {'PASS' if ratio <= LIMIT else 'FAIL'}")
    step = f"{statistics.median(per_step):.2f}" if per_step else "n/a (no step completed during a stream)"
    print(f"TRAIN_STEP_WHILE_SERVING_S {step}")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
