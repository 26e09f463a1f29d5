"""The server against llama.cpp's `llama-server` on the same model, machine and prompts, side by side.

    make bench-llamacpp                           # builds llama.cpp once (scripts/build_llamacpp.sh), then this
    .venv/bin/python bench/llamacpp.py --quick    # one round per figure

Both servers hold the same weights: the packaged SmolLM2 GGUF, which the server dequantises to
float32, converted to an f32 GGUF by llama.cpp's own `llama-quantize`. llama.cpp is the source
vendored in the llama-cpp-python sdist, built native for this CPU. Each side runs with its defaults
(ours: `make serve`'s; llama.cpp: its own, e.g. an f16 KV cache and its thread count), except
llama.cpp's slot count and context (`-np`, `-c`), which must hold the section's streams.

Figures (one line each, as bench/run.py prints them):

- `P18`: decode tokens/s of one stream (64-token prompt, 128 new tokens, greedy, ignore EOS),
  ours ÷ llama.cpp's; tokens/s = 127 ÷ (last token's arrival − first token's);
- `P18_TTFT`: that request's time to first token, ours ÷ llama.cpp's (≤ 1: ours is no slower);
- `LLAMA_LONG`: 16 concurrent 1,024-token prompts, 33 new tokens each: llama.cpp's decode step ÷
  ours (median gap between a stream's tokens while all 16 decode, as P8 measures it);
- `LLAMA_B32`: 32 concurrent 64-token prompts, 32 new tokens each: our generated tokens/s ÷
  llama.cpp's (wall time from the first send to the last token).

Every figure is the median of block ratios, each block run back to back in a symmetric order (ours,
llama.cpp, llama.cpp, ours), so that the drift of a shared machine hits both sides alike. Only one
server computes at a time: both stay up, but only one is sent requests. `P18_AGREE` reports how many
of the 128 greedy tokens the two servers agree on before the first difference (llama.cpp's f16 KV
cache and its own kernels drift from float32 after a while: context, not a target).

Without the build this prints `LLAMACPP SKIP` with what to run, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import httpx  # noqa: E402
from common import REPO, ServerProcess, machine_info, median, random_prompts, versions  # noqa: E402
from run import Report, log  # noqa: E402

DEFAULT_DIR = REPO / "bench" / ".llamacpp"
SINGLE_PROMPT = 64
LONG_STREAMS, LONG_PROMPT, LONG_NEW = 16, 1024, 33
SHORT_STREAMS, SHORT_PROMPT, SHORT_NEW = 32, 64, 32

Stream = tuple[float, list[float], list[int]]  # (send time, arrival time of each token, token ids)


class LlamaServer(ServerProcess):
    """`llama-server` as a subprocess on a free port, with the slots and context a section needs."""

    def __init__(self, binary: Path, model: Path, log_path: Path, slots: int, context: int) -> None:
        super().__init__(Path(), log_path)
        self.binary, self.model_path, self.slots, self.context = binary, model, slots, context

    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.model_path), "--host", "127.0.0.1", "--port", str(self.port),
                "-np", str(self.slots), "-c", str(self.context)]


def _sse(client: httpx.Client, path: str, body: dict, tokens_of: Callable[[dict, int], list[int]]) -> Stream:
    sent, times, ids = time.perf_counter(), [], []
    # A fresh connection a request, on both sides alike: llama-server may drop a kept-alive connection
    # right after a stream ends, and the next request on it then fails with no response.
    with client.stream("POST", path, json=body, headers={"Connection": "close"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            new = tokens_of(event, len(ids))
            now = time.perf_counter()
            times.extend(now for _ in new)
            ids.extend(new)
    return sent, times, ids


def ours(client: httpx.Client, prompt: list[int], new: int) -> Stream:
    body = {"prompt": prompt, "max_new_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True}
    return _sse(client, "/generate", body, lambda e, _: e.get("token_ids", []))


def llama(client: httpx.Client, prompt: list[int], new: int) -> Stream:
    # cache_prompt off: a repeated prompt must be computed again, as ours is
    body = {"prompt": prompt, "n_predict": new, "temperature": 0, "top_k": 1, "ignore_eos": True, "stream": True,
            "cache_prompt": False, "return_tokens": True}
    return _sse(client, "/completion", body, _llama_tokens)


def _llama_tokens(event: dict, seen: int) -> list[int]:
    """The tokens an event of llama.cpp's stream adds: its own, plus any it held back (a partial UTF-8
    character) and counts in `tokens_predicted` without naming them (-1)."""
    got = list(event.get("tokens", []))
    return got + [-1] * max(0, int(event.get("tokens_predicted", seen)) - seen - len(got))


def run_streams(pool: ThreadPoolExecutor, client: httpx.Client, side: Callable, prompts: list[list[int]],
                new: int) -> list[Stream]:
    streams = [f.result() for f in [pool.submit(side, client, p, new) for p in prompts]]
    for _, times, _ in streams:
        if len(times) != new:
            raise RuntimeError(f"expected {new} tokens, got {len(times)}")
    return streams


def blocks(rounds: int, measure: Callable[[str], float], report: Report, name: str) -> tuple[list[float], dict]:
    """ABBA blocks (ours, llama, llama, ours); block ratio = mean(ours) ÷ mean(llama)."""
    ratios, sides = [], {"ours": [], "llama": []}
    for rnd in range(rounds):
        block = {"ours": [], "llama": []}
        for side in ("ours", "llama", "llama", "ours"):
            value = measure(side)
            block[side].append(value)
            sides[side].append(value)
        ratios.append(statistics.fmean(block["ours"]) / statistics.fmean(block["llama"]))
        log(f"{name} round {rnd + 1}/{rounds}: ours {block['ours']}, llama.cpp {block['llama']}")
    report.samples(name, {"block_ratios": ratios, "sides": sides})
    report.save()
    return ratios, sides


def single_stream(args: argparse.Namespace, report: Report, url: dict[str, str]) -> None:
    new = args.single_new
    prompt = random_prompts(1, SINGLE_PROMPT, seed=18)[0]
    clients = {side: httpx.Client(base_url=u, timeout=600) for side, u in url.items()}
    calls = {"ours": ours, "llama": llama}
    ttft: dict[str, list[float]] = {"ours": [], "llama": []}
    outputs: dict[str, list[int]] = {}

    def measure(side: str) -> float:
        sent, times, ids = calls[side](clients[side], prompt, new)
        if len(times) != new:
            raise RuntimeError(f"{side}: expected {new} tokens, got {len(times)}")
        ttft[side].append(times[0] - sent)
        outputs[side] = ids
        return (new - 1) / (times[-1] - times[0])

    for side in calls:  # warm-up, not counted
        measure(side)
    for times in ttft.values():
        times.clear()
    ratios, sides = blocks(args.rounds, measure, report, "P18")
    pairs = [(ttft["ours"][2 * i : 2 * i + 2], ttft["llama"][2 * i : 2 * i + 2]) for i in range(args.rounds)]
    ttft_ratios = [statistics.fmean(a) / statistics.fmean(b) for a, b in pairs]
    report.figure("P18", median(ratios), ">=1.0", f"ratio (our decode tok/s ÷ llama.cpp's, 1 stream, 64+{new} tokens)",
                  blocks=ratios, ours_tok_s=median(sides["ours"]), llama_tok_s=median(sides["llama"]))
    report.figure("P18_TTFT", median(ttft_ratios), "<=1.0", "ratio (our time to first token ÷ llama.cpp's)",
                  blocks=ttft_ratios, ours_ms=1000 * median(ttft["ours"]), llama_ms=1000 * median(ttft["llama"]))
    agree = next((i for i, (a, b) in enumerate(zip(outputs["ours"], outputs["llama"], strict=True)) if a != b),
                 new)
    report.figure("P18_AGREE", agree, None, f"greedy tokens equal before the first difference, of {new}")
    for c in clients.values():
        c.close()


def many_streams(args: argparse.Namespace, report: Report, url: dict[str, str], name: str) -> None:
    long = name == "LLAMA_LONG"
    n, length, new = (LONG_STREAMS, LONG_PROMPT, LONG_NEW) if long else (SHORT_STREAMS, SHORT_PROMPT, SHORT_NEW)
    prompts = random_prompts(n, length, seed=19 if long else 20)
    clients = {side: httpx.Client(base_url=u, timeout=1800, limits=httpx.Limits(max_connections=n))
               for side, u in url.items()}
    calls = {"ours": ours, "llama": llama}
    with ThreadPoolExecutor(max_workers=n) as pool:

        def measure(side: str) -> float:
            streams = run_streams(pool, clients[side], calls[side], prompts, new)
            if long:  # decode step (s), P8's definition: only steps where every stream was decoding
                everyone = max(times[0] for _, times, _ in streams)
                return median([b - a for _, times, _ in streams for a, b in zip(times, times[1:], strict=False)
                               if a >= everyone])
            first = min(sent for sent, _, _ in streams)
            return n * new / (max(times[-1] for _, times, _ in streams) - first)  # tokens/s

        for side in calls:
            measure(side)
        ratios, sides = blocks(args.rounds, measure, report, name)
    if long:  # a step time: llama.cpp's ÷ ours, so that > 1 means we are faster
        report.figure(name, median([1 / r for r in ratios]), ">=1.0",
                      "ratio (llama.cpp decode step ÷ ours, 16 x 1,024-token prompts)",
                      blocks=[1 / r for r in ratios], ours_ms=1000 * median(sides["ours"]),
                      llama_ms=1000 * median(sides["llama"]))
    else:
        report.figure(name, median(ratios), ">=1.0", "ratio (our tok/s ÷ llama.cpp's, 32 x 64-token prompts)",
                      blocks=ratios, ours_tok_s=median(sides["ours"]), llama_tok_s=median(sides["llama"]))
    for c in clients.values():
        c.close()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("LLAMACPP_DIR", DEFAULT_DIR)),
                   help="where scripts/build_llamacpp.sh put build/bin/llama-server and model-f32.gguf")
    p.add_argument("--quick", action="store_true", help="one round per figure")
    p.add_argument("--rounds", type=int, default=None, help="ABBA blocks per figure (3 full, 1 quick)")
    p.add_argument("--only", default="single,long,short", help="comma-separated subset of single,long,short")
    p.add_argument("--single-new", type=int, default=128,
                   help="new tokens of P18's stream (P18 is defined at 128; fewer only for a smoke run)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "llamacpp.json")
    p.add_argument("--server-env", action="append", default=[], metavar="REFT_X=V",
                   help="a setting for our server (the caller's REFT_* variables are otherwise ignored)")
    args = p.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.env = dict(kv.split("=", 1) for kv in args.server_env)
    return args


def main() -> int:
    args = parse_args()
    binary, model = args.dir / "build" / "bin" / "llama-server", args.dir / "model-f32.gguf"
    if not binary.exists() or not model.exists():
        print(f"LLAMACPP SKIP: no llama.cpp build at {args.dir} ({binary.name} and {model.name}); "
              "run `make bench-llamacpp` (or scripts/build_llamacpp.sh) to build it", flush=True)
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    report = Report(args.out, {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                               "versions": versions(), "llama_server": str(binary), "config": vars(args)})
    tmp = Path(tempfile.mkdtemp(prefix="reft-llamacpp-"))
    (tmp / "registry").mkdir()
    server = ServerProcess(tmp / "registry", tmp / "server.log", None, args.env)
    try:
        report.figure("START_S", server.start(), None, "s (our server, to /health 200)")
        for section, slots, context, name in (("single", 1, 4096, "P18"),
                                              ("long", LONG_STREAMS, LONG_STREAMS * 1152, "LLAMA_LONG"),
                                              ("short", SHORT_STREAMS, SHORT_STREAMS * 256, "LLAMA_B32")):
            if section not in sections:
                continue
            peer = LlamaServer(binary, model, tmp / "llama-server.log", slots, context)
            log(f"{name}: llama-server -np {slots} -c {context} started in {peer.start():.1f} s")
            try:
                url = {"ours": server.url, "llama": peer.url}
                if section == "single":
                    single_stream(args, report, url)
                else:
                    many_streams(args, report, url, name)
            finally:
                peer.stop()
    finally:
        server.stop()
        report.data["machine"]["load_avg_end"] = machine_info()["load_avg"]
        report.save()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
