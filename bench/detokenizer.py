"""The engine's incremental detokenizer (`TextTracker`) against `tokenizers.decoders.DecodeStream`.

    .venv/bin/python bench/detokenizer.py [--model DIR] [--streams 200] [--batch 32] [--tokens 256]

Prints how many random token streams (1-80 tokens, half of them from text with emoji, accents and
punctuation) each streams differently from the tokenizer's own `decode` of the whole stream, how
many DecodeStream gets wrong only by the tail it never flushes, and the median time per token of
`--batch` streams of `--tokens` tokens of README.md's prose, fed one token per stream per step as
the engine does (TextTracker with a stop string, as a request with `stop` runs it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from server.engine.output import TextTracker
from server.model import converted_gguf_dir, default_gguf_path

MIXED = "😀 é ñ 漢字 ... don't , . ! Hello world , I'm here ."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: the converted default GGUF)")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model or str(converted_gguf_dir(default_gguf_path())))
    backend = tokenizer.backend_tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def stream(ids: list[int]) -> str:
        ds = DecodeStream(skip_special_tokens=True)
        return "".join(ds.step(backend, i) or "" for i in ids)

    def tracked(ids: list[int]) -> str:
        tracker = TextTracker(decode, ())
        return "".join(tracker.add(i)[0] for i in ids) + tracker.add(None)[0]

    rng = random.Random(5)
    mixed = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    ours = theirs = tail_only = 0
    for _ in range(args.streams):
        ids = [rng.choice(mixed) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
               for _ in range(rng.randint(1, 80))]
        full, streamed = decode(ids), stream(ids)
        ours += tracked(ids) != full
        theirs += streamed != full
        plain = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        tail_only += streamed != plain and plain.startswith(streamed)
    print(f"random streams differing from a full decode: TextTracker {ours}/{args.streams}, "
          f"DecodeStream {theirs}/{args.streams} ({tail_only} of them, without clean-up, only by an unflushed tail)")

    prose = tokenizer((Path(__file__).parent.parent / "README.md").read_text(), add_special_tokens=False)["input_ids"]
    batch = [prose[i * args.tokens : (i + 1) * args.tokens] for i in range(args.batch)]
    print(f"prose streams differing from a full decode: DecodeStream "
          f"{sum(stream(ids) != decode(ids) for ids in batch)}/{args.batch}")

    def per_token(make, step) -> float:  # noqa: ANN001 - a factory and its step function
        states = [make() for _ in batch]
        started = time.perf_counter()
        for t in range(args.tokens):
            for state, ids in zip(states, batch, strict=True):
                step(state, ids[t])
        return (time.perf_counter() - started) / (args.tokens * args.batch)

    tt = [per_token(lambda: TextTracker(decode, ("\n\n\n",)), lambda s, i: s.add(i)) for _ in range(args.reps)]
    ds = [per_token(lambda: DecodeStream(skip_special_tokens=True), lambda s, i: s.step(backend, i))
          for _ in range(args.reps)]
    print(f"per token, {args.batch} streams at once (median of {args.reps}): "
          f"TextTracker {1e6 * statistics.median(tt):.1f} us, DecodeStream {1e6 * statistics.median(ds):.1f} us")


if __name__ == "__main__":
    main()
