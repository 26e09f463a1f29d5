"""Per-request sampling: greedy, temperature, top-k, top-p, seeds; stop strings and stop tokens.

Greedy rows of a batch are one argmax. Sampled rows each draw from their own torch.Generator,
so a request with a seed gives the same text whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> Tensor:
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


@dataclass
class TextTracker:
    """Turns a growing list of token ids into text deltas safe to stream.

    Holds back an incomplete UTF-8 character and any tail that could still become a stop string,
    and finds the earliest stop string in the whole completion. Each token decodes only a short
    window (the tokens since the last complete character, and the step before them for context),
    so a long completion costs the same per token as a short one.
    """

    decode: object  # Callable[[list[int]], str]
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion so far; may end in an incomplete character (U+FFFD)
    emitted: int = 0
    _stable: str = ""  # text of token_ids[:_read], complete characters only
    _window: int = 0  # the decode window starts here: context for the tokens after _read
    _read: int = 0

    def add(self, token: int | None) -> tuple[str, bool]:
        """Add a token (None = no more tokens); return (new text to send, hit a stop string)."""
        searched = self.emitted
        if token is not None:
            self.token_ids.append(token)
            self._extend()
        hit = False
        if self.stop:
            # A stop string starting before `emitted` would have been found by an earlier call.
            starts = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
            if starts:
                self.text = self.text[: min(starts)]
                hit = True
        safe = len(self.text)
        if token is not None and not hit:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            if self.stop:
                hold = max(len(s) for s in self.stop) - 1
                safe = min(safe, len(self.text) - hold) if hold > 0 else safe
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta, hit

    def _extend(self) -> None:
        decode = self.decode
        context = decode(self.token_ids[self._window : self._read])  # type: ignore[operator]
        window = decode(self.token_ids[self._window :])  # type: ignore[operator]
        if not window.startswith(context):  # the new token rewrote its context: decode everything
            self._stable, self._window, self._read = "", 0, 0
            context, window = "", decode(self.token_ids)  # type: ignore[operator]
        new = window[len(context) :]
        if new.endswith("\ufffd"):  # an incomplete character: keep decoding from here next time
            self.text = self._stable + new
            return
        self._stable += new
        self.text = self._stable
        self._window, self._read = self._read, len(self.token_ids)
