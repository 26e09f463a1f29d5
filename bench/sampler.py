"""Time one sampling call for a batch: the batched device `Sampler` against the host loop it replaced.

    .venv/bin/python bench/sampler.py [--batch 32] [--vocab 49152] [--reps 20] [--device cpu]

Prints `name sampler_ms sample_ms ratio` per workload: every row greedy, every row top-p 0.9,
and a mix (half greedy, a quarter top-p 0.9, a quarter top-k 50), plus the Sampler alone with
penalties and logprobs on every row (the host loop has neither). Median of --reps calls after
one warm-up call; logits are random, the same for both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from server.engine.sampling import Sampler, SamplingParams


# The engine's sampler before the batched one: every sampled row on the host, one torch.Generator each.
def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def host_sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """Pick the next token of every row of logits [B, V] (float32, on CPU or device)."""
    tokens = logits.argmax(dim=-1).cpu()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        tokens[row] = _sample_row(logits[row].cpu(), p, gen)
    return tokens


def _sample_row(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    # Shift first: the best score becomes 0, so even a tiny temperature cannot overflow to inf - inf.
    scores = (logits - logits.max()) / p.temperature
    if 0 < p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def workloads(batch: int) -> dict[str, list[SamplingParams]]:
    greedy = SamplingParams()
    top_p = SamplingParams(temperature=0.8, top_p=0.9)
    top_k = SamplingParams(temperature=1.0, top_k=50)
    quarter = batch // 4
    return {
        "greedy": [greedy] * batch,
        "top_p_0.9": [top_p] * batch,
        "mixed": [greedy] * (batch - 2 * quarter) + [top_p] * quarter + [top_k] * quarter,
        "penalties_logprobs": [SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5,
                                              repetition_penalty=1.1, logprobs=5)] * batch,
    }


def median_ms(call: Callable[[], object], reps: int, device: torch.device) -> float:
    call()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    logits = (torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    slots = torch.arange(args.batch, device=device)
    prompt = list(range(64))
    print(f"batch {args.batch}, vocab {args.vocab}, {device}, torch threads {torch.get_num_threads()}")
    print(f"{'workload':<20} {'Sampler ms':>10} {'sample() ms':>11} {'ratio':>6}")
    for name, rows in workloads(args.batch).items():
        sampler = Sampler(args.batch, args.vocab, device)
        for slot, params in enumerate(rows):
            sampler.add(slot, params, prompt)
        ours = median_ms(lambda sampler=sampler: sampler(logits, slots), args.reps, device)
        if any(p.logprobs is not None for p in rows):
            print(f"{name:<20} {ours:>10.2f} {'-':>11} {'-':>6}")
            continue
        generators = [make_generator(p) for p in rows]
        theirs = median_ms(lambda rows=rows, gens=generators: host_sample(logits, rows, gens), args.reps, device)
        print(f"{name:<20} {ours:>10.2f} {theirs:>11.2f} {theirs / ours:>6.2f}")


if __name__ == "__main__":
    main()
