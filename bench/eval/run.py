"""`make eval`: lm-evaluation-harness scores an adapter against the base model through the server.

Starts `reft-serve serve --adapters adapters/` on a free port (default device and dtype), then runs the lm_eval CLI,
unchanged, with its `local-completions` model on the local tasks in bench/eval (reft_mc, reft_gen), once
for `base` and once for the adapter, and prints the scores side by side with each run's wall time.
`--hf` also runs lm-eval's in-process `hf` model on reft_mc (same weights, float32, CPU), the reference
for both the scores and the time.

The local-completions model_args, and why:

    base_url=http://127.0.0.1:PORT/v1/completions   the OpenAI legacy endpoint: loglikelihood requests need
                                                    `echo` + `logprobs`, which only completions has
    model=NAME                                      an adapter name, or `base` for no intervention
    tokenizer=DIR,tokenizer_backend=huggingface     DIR is the base model's local HF directory
                                                    (server.model.converted_gguf_dir): lm-eval tokenizes
                                                    itself and sends token ids, so context lengths match
    num_concurrent=8                                requests in flight at once, which the engine batches
                                                    (batch_size stays 1: one prompt per request)
    max_retries=1                                   a failed request is a bug here, not a flaky network
    timeout=3600                                    the default 300 s is one request on a busy 2-core box

add_bos_token stays False (the default): the tasks' prompts already start with <|im_start|>, SmolLM2's BOS,
and lm-eval's `hf` model sees the same ids. HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set: nothing comes
from the hub. lm_eval runs from the repo root, which is where the YAMLs' data_files are resolved.

    .venv/bin/python bench/eval/run.py --adapter shout [--hf] [--limit N] [--tasks reft_mc,reft_gen]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from common import ServerProcess  # noqa: E402

from server.model import converted_gguf_dir, default_gguf_path  # noqa: E402

BIN = Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def model_dir() -> Path:
    """The base model as a local HF directory (what the server dequantised its GGUF into)."""
    return Path(converted_gguf_dir(default_gguf_path()))


def lm_eval(model: str, model_args: str, tasks: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    """Run the lm_eval CLI (printed first) from the repo root; return its results and the wall time."""
    cmd = [str(BIN / "lm_eval"), "run", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", "bench/eval", "--output_path", str(out), "--log_samples", *extra]
    print("+", " ".join(f"{k}={v}" for k, v in OFFLINE.items()), shlex.join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE}, check=True)
    elapsed = time.monotonic() - start
    (results,) = out.glob("**/results_*.json")
    return json.loads(results.read_text())["results"], elapsed


def scores(results: dict) -> dict[str, float]:
    """{"task metric": value} from lm-eval's results, standard errors left out."""
    return {f"{task} {key.split(',')[0]}": value for task, metrics in results.items()
            for key, value in metrics.items() if "," in key and "_stderr" not in key}


def run_tasks(model: str, model_args: str, tasks: list[str], out: Path, extra: list[str]) -> dict[str, float]:
    """One lm_eval run per task, so that each task has its own wall time (a row "TASK wall time (s)")."""
    column: dict[str, float] = {}
    for task in tasks:
        results, elapsed = lm_eval(model, model_args, task, out / task, extra)
        column |= scores(results) | {f"{task} wall time (s)": elapsed}
    return column


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="shout", help="adapter in adapters/ to compare with base")
    parser.add_argument("--tasks", default="reft_mc,reft_gen", help="comma-separated lm-eval tasks")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--num-concurrent", type=int, default=8, help="requests in flight (local-completions)")
    parser.add_argument("--hf", action="store_true", help="also run lm-eval's in-process hf model on reft_mc")
    args = parser.parse_args()

    tokenizer = model_dir()
    tasks = args.tasks.split(",")
    extra = ["--limit", str(args.limit)] if args.limit else []
    out = Path(tempfile.mkdtemp(prefix="reft-eval-"))
    columns: dict[str, dict[str, float]] = {}
    server = ServerProcess(REPO / "adapters", out / "server.log")  # the caller's REFT_* settings do not apply
    server.start()
    try:
        for name in ("base", args.adapter):
            model_args = (f"base_url={server.url}/v1/completions,model={name},tokenizer={tokenizer},"
                          f"tokenizer_backend=huggingface,num_concurrent={args.num_concurrent},"
                          "max_retries=1,timeout=3600")
            columns[f"server {name}"] = run_tasks("local-completions", model_args, tasks, out / name, extra)
    finally:
        server.stop()
    if args.hf:  # after the server has stopped, so that the two never share the CPUs
        columns["hf base (in-process)"] = run_tasks(
            "hf", f"pretrained={tokenizer},dtype=float32", ["reft_mc"], out / "hf",
            ["--device", "cpu", "--batch_size", str(args.num_concurrent), *extra])

    rows = sorted({row for column in columns.values() for row in column})
    width = max(map(len, rows))
    print(f"\n{'':{width}}  " + "  ".join(f"{name:>20}" for name in columns))
    for row in rows:
        spec = ".1f" if row.endswith("(s)") else ".3f"
        cells = [format(column[row], f"20{spec}") if row in column else f"{'-':>20}" for column in columns.values()]
        print(f"{row:{width}}  " + "  ".join(cells))
    print(f"\nresults, samples and the server log: {out}")


if __name__ == "__main__":
    main()
