"""Per-request sampling: greedy, temperature, top-k, top-p, seeds, penalties, logit bias, logprobs.

`Sampler` samples a whole batch on the model's device. Each request's parameters live in a row
of tables written once, when it joins; a call gathers its rows, applies logit bias and
penalties, samples every row at once and brings the ids (and any logprobs) back in one transfer.
A sampled row draws by inverse CDF with a uniform hashed from (seed, step), so a seeded row's
tokens depend neither on what shares its batch nor on the row it sits in.

Stop token ids and stop strings are checked on the host, on the ids a call returns, by
server/engine/output.py.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from server.engine.bounds import (
    FREQUENCY_PENALTY,
    LOGPROBS,
    PRESENCE_PENALTY,
    PROMPT_LOGPROBS,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_K,
    TOP_P,
)

if TYPE_CHECKING:
    from server.engine.structured import TokenMask

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value; larger ones are clamped


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
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt or the output (divides positive logits)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int | None = None  # top alternatives per token to report (0..20); None = no logprobs
    prompt_logprobs: int | None = None  # the same for the prompt's own tokens (echo); None = not computed

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the row's most likely tokens, under the model's own distribution."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first; as many as the row asked


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where the row did not ask for logprobs


@dataclass(frozen=True)
class _Needs:
    """What the rows held ask for, so that a call skips the work nobody needs."""

    sampling: bool = False  # some row has temperature > 0
    truncating: bool = False  # some sampling row keeps only its top-k or top-p tokens
    candidates: int = 0  # widest top-k among sampling rows (the vocabulary size when one has none)
    penalties: bool = False  # some row has a penalty: generated tokens are counted
    repetition: bool = False  # some row has repetition_penalty != 1
    additive: bool = False  # some row has a presence or frequency penalty
    bias: bool = False
    logprobs: int = -1  # most top alternatives asked for; -1 when no row asked for logprobs


# Columns of the row tables.
_TEMPERATURE, _TOP_P, _PRESENCE, _FREQUENCY, _REPETITION = range(5)
_TOP_K, _KEY_A, _KEY_B, _LOGPROBS = range(4)
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


class Sampler:
    """Samples the next token of every row of a batch on the model's device.

    Per-row parameters live on the device in tables [max_rows, ...], written by `add()` when
    a request joins and never rebuilt per step. A join rewrites its row of every table, whatever
    the new request asks for, because a call applies a table to all its rows once any row needs it:
    nothing a request leaves in its row (bias, counts, prompt tokens, seed, step, logprob width)
    reaches the next one there. Work that no row held needs (sorting for
    top-p, penalties, bias, logprobs) is skipped; rows that do not ask for it pass through the
    shared computation unchanged (bias 0, penalties 0 and 1 are exact no-ops), so greedy rows are
    `logits.argmax(-1)` bit for bit.

    Sampling is by inverse CDF: the row's probabilities (after temperature, top-k and top-p) are
    summed in float64, in token id order, and a uniform picks the token. The uniform is a counter-based hash of the
    row's seed and its step (tokens sampled so far), computed with int64 tensor ops: no generator
    state, so the same seed gives the same tokens in any batch and any row.

    Logprobs are the model's: log_softmax of the raw logits, before bias, penalties, temperature
    and truncation (vLLM's default, "raw_logprobs").
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._floats = torch.zeros((max_rows, 5), dtype=torch.float32, device=self.device)
        self._ints = torch.zeros((max_rows, 4), dtype=torch.int64, device=self.device)
        self._steps = torch.zeros(max_rows, dtype=torch.int64, device=self.device)
        # [max_rows, V] tables, allocated when the first row that needs them joins.
        self._counts: Tensor | None = None  # int32: times each token was generated
        self._prompt_seen: Tensor | None = None  # bool: token occurs in the prompt
        self._bias: Tensor | None = None  # float32: logit bias
        self._rows: dict[int, SamplingParams] = {}
        self._needs = _Needs()

    # ---- rows joining and leaving -------------------------------------------------------

    def check(self, params: SamplingParams) -> None:
        """Raise ValueError, with the offending value, for a parameter outside its range (server/engine/bounds.py)
        or a token id outside this sampler's vocabulary."""
        p = params
        ranged = ((TEMPERATURE, p.temperature), (TOP_P, p.top_p), (TOP_K, p.top_k),
                  (PRESENCE_PENALTY, p.presence_penalty), (FREQUENCY_PENALTY, p.frequency_penalty),
                  (REPETITION_PENALTY, p.repetition_penalty), (LOGPROBS, p.logprobs),
                  (PROMPT_LOGPROBS, p.prompt_logprobs))
        for bound, value in ranged:
            if value is not None and value not in bound:
                raise ValueError(bound.refusal(value))
        bad = [t for t, b in p.logit_bias if not 0 <= t < self.vocab_size or not math.isfinite(b)]
        if bad:
            raise ValueError(
                f"logit_bias keys must be token ids in 0..{self.vocab_size - 1} with finite values; got {bad[:5]}"
            )

    @torch.inference_mode()
    def add(self, row: int, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        """A request joins at `row`: write its parameters into that row of the tables (a few small copies)."""
        if not 0 <= row < self.max_rows:
            raise ValueError(f"row {row} is outside 0..{self.max_rows - 1}")
        if row in self._rows:
            raise ValueError(f"row {row} is taken")
        self.check(params)
        if params.repetition_penalty != 1.0 and any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must lie in 0..{self.vocab_size - 1}")
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        key_a, key_b = _seed_key(seed)
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        floats = [params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty,
                  params.repetition_penalty]
        ints = [top_k, key_a, key_b, -1 if params.logprobs is None else params.logprobs]
        self._floats[row] = torch.tensor(floats, dtype=torch.float32)
        self._ints[row] = torch.tensor(ints, dtype=torch.int64)
        self._steps[row] = 0
        # Every table that exists gets the whole row rewritten, whatever this row asks for: a call applies a
        # table to every row of the batch once any row needs it, so a stale row would act on this one.
        if _has_penalties(params) and (self._counts is None or self._prompt_seen is None):
            self._counts = torch.zeros((self.max_rows, self.vocab_size), dtype=torch.int32, device=self.device)
            self._prompt_seen = torch.zeros((self.max_rows, self.vocab_size), dtype=torch.bool, device=self.device)
        if self._counts is not None and self._prompt_seen is not None:
            self._counts[row] = 0
            self._prompt_seen[row] = False
            if params.repetition_penalty != 1.0 and prompt_ids:
                index = torch.tensor(list(prompt_ids), dtype=torch.long).to(self.device)
                self._prompt_seen[row].index_fill_(0, index, True)
        if params.logit_bias and self._bias is None:
            self._bias = torch.zeros((self.max_rows, self.vocab_size), dtype=torch.float32, device=self.device)
        if self._bias is not None and params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            bias = torch.zeros(self.vocab_size, dtype=torch.float32)
            bias[list(ids)] = torch.tensor(values, dtype=torch.float32).clamp(-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
            self._bias[row] = bias.to(self.device)
        elif self._bias is not None:
            self._bias[row] = 0.0
        self._rows[row] = params
        self._needs = self._summarise()

    def remove(self, row: int) -> None:
        """A request leaves; its row may be given to the next one that joins."""
        if self._rows.pop(row, None) is None:
            raise ValueError(f"row {row} holds no request")
        self._needs = self._summarise()

    def _summarise(self) -> _Needs:
        rows = list(self._rows.values())
        sampling = [p for p in rows if not p.greedy]
        widths = [p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size for p in sampling]
        return _Needs(
            sampling=bool(sampling),
            truncating=any(0 < p.top_k < self.vocab_size or p.top_p < 1.0 for p in sampling),
            candidates=max(widths, default=0),
            penalties=any(_has_penalties(p) for p in rows),
            repetition=any(p.repetition_penalty != 1.0 for p in rows),
            additive=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in rows),
            bias=any(p.logit_bias for p in rows),
            logprobs=max((p.logprobs for p in rows if p.logprobs is not None), default=-1),
        )

    # ---- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, logits: Tensor, rows: Tensor, mask: TokenMask | None = None) -> SampleOutput:
        """Sample row i of logits [B, V] (float32, on the device) for the request at row rows[i].

        `mask` (constrained decoding) sinks its rows' disallowed tokens before anything else, so no bias,
        penalty, greedy pick or draw can choose one; logprobs stay the model's own.
        Advances each row's step and, where penalties are on, its generated-token counts.
        """
        needs = self._needs
        scores = logits if mask is None else mask.apply(logits)
        if needs.bias:
            assert self._bias is not None
            scores = scores + self._bias.index_select(0, rows)
        if needs.penalties:
            scores = self._penalise(scores, rows)
        tokens = scores.argmax(dim=-1)
        if needs.sampling:
            temperature = self._floats.index_select(0, rows)[:, _TEMPERATURE]
            tokens = torch.where(temperature > 0, self._draw(scores, rows, temperature), tokens)
        self._steps.index_add_(0, rows, torch.ones_like(rows))
        if needs.penalties:
            assert self._counts is not None
            flat = rows * self.vocab_size + tokens
            self._counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        if needs.logprobs < 0:
            return SampleOutput(tokens.tolist(), [None] * len(rows))
        return self._with_logprobs(logits, rows, tokens, needs.logprobs)

    def _penalise(self, scores: Tensor, rows: Tensor) -> Tensor:
        """Repetition penalty on tokens of the prompt or the output, then frequency and presence on the output's."""
        assert self._counts is not None and self._prompt_seen is not None
        counts = self._counts.index_select(0, rows)
        params = self._floats.index_select(0, rows)
        generated = counts > 0
        if self._needs.repetition:
            seen = self._prompt_seen.index_select(0, rows) | generated
            repetition = params[:, _REPETITION, None]
            scores = torch.where(seen, torch.where(scores > 0, scores / repetition, scores * repetition), scores)
        if self._needs.additive:
            scores = scores - params[:, _FREQUENCY, None] * counts - params[:, _PRESENCE, None] * generated
        return scores

    def _draw(self, scores: Tensor, rows: Tensor, temperature: Tensor) -> Tensor:
        """Sample every row by inverse CDF over its kept tokens, in token id order; greedy rows' draws are unused.

        Summing in token id order, not in order of probability, keeps a row's draw independent of
        how the batch's other rows made this call truncate (top-k, full sort, or nothing).
        """
        ints = self._ints.index_select(0, rows)
        # Shift first: the best score becomes 0, so even a tiny temperature cannot overflow to inf - inf.
        safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / safe[:, None]
        if self._needs.truncating:
            top_p = self._floats.index_select(0, rows)[:, _TOP_P]
            scores = scores.masked_fill(scores < self._cut(scores, ints[:, _TOP_K], top_p), float("-inf"))
        cumulative = scores.softmax(dim=-1).double().cumsum(dim=-1)
        uniform = _uniform(ints[:, _KEY_A], ints[:, _KEY_B], self._steps.index_select(0, rows))
        target = uniform[:, None] * cumulative[:, -1:]
        index = torch.searchsorted(cumulative, target, right=True).clamp_(max=cumulative.shape[-1] - 1)
        return index.squeeze(-1)

    def _cut(self, scores: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
        """Each row's lowest kept score [B, 1]: of its top_k best, the fewest whose mass reaches top_p.

        Rows' scores peak at 0. Tokens tied with the cut are kept too.
        """
        width = self._needs.candidates
        if width * 8 <= self.vocab_size:
            best = scores.topk(width, dim=-1).values
        else:
            best = scores.sort(dim=-1, descending=True).values
            width = best.shape[-1]
        position = torch.arange(width, device=best.device)
        top_k = top_k.clamp(max=width)[:, None]
        weight = best.exp() * (position < top_k)
        cumulative = weight.cumsum(dim=-1)
        mass = cumulative.gather(-1, top_k - 1)
        top_p = top_p[:, None]
        keep = (position < top_k) & ((cumulative - weight < top_p * mass) | (top_p >= 1.0) | (position == 0))
        return best.gather(-1, keep.sum(dim=-1, keepdim=True) - 1)

    def _with_logprobs(self, logits: Tensor, rows: Tensor, tokens: Tensor, most: int) -> SampleOutput:
        """Pack ids, the sampled tokens' logprobs and the top alternatives into one tensor; fetch it once."""
        return SampleOutput(*_gather_logprobs(logits, tokens, self._ints.index_select(0, rows)[:, _LOGPROBS], most))


def prompt_logprobs(logits: Tensor, targets: Tensor, top: int) -> list[TokenLogprobs]:
    """Logprob of each prompt token under the logits at the position before it, with `top` alternatives.

    logits [n, V] are the forward's own at n consecutive prompt positions, targets [n] the tokens
    that follow them; one host transfer.
    """
    _, out = _gather_logprobs(logits, targets, torch.full_like(targets, top), top)
    return [lp for lp in out if lp is not None]


def _gather_logprobs(
    logits: Tensor, tokens: Tensor, asked: Tensor, most: int
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """tokens as ids, and row i's logprob of tokens[i] with its asked[i] most likely alternatives (None where
    asked[i] < 0): all packed into one tensor, fetched from the device once."""
    logprobs = logits.log_softmax(dim=-1)
    columns = [tokens[:, None].double(), asked[:, None].double(), logprobs.gather(-1, tokens[:, None]).double()]
    if most > 0:
        top_values, top_ids = logprobs.topk(most, dim=-1)
        columns += [top_ids.double(), top_values.double()]
    ids: list[int] = []
    out: list[TokenLogprobs | None] = []
    for row in torch.cat(columns, dim=-1).tolist():
        ids.append(int(row[0]))
        n = int(row[1])
        if n < 0:
            out.append(None)
            continue
        top = tuple((int(i), v) for i, v in zip(row[3 : 3 + n], row[3 + most : 3 + most + n], strict=True))
        out.append(TokenLogprobs(row[2], top))
    return ids, out


def _has_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _seed_key(seed: int) -> tuple[int, int]:
    """Two 32-bit words from any integer seed (splitmix64's finaliser), so nearby seeds share nothing."""
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z & _M32, z >> 32


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in two halves so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """The lowbias32 integer hash (Wellons' hash-prospector): a bijection of 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform a row seeded with `seed` draws at `step`: what a check outside the engine recomputes a draw with."""
    key_a, key_b = _seed_key(seed)
    return float(_uniform(torch.tensor([key_a]), torch.tensor([key_b]), torch.tensor([step]))[0])


def _uniform(key_a: Tensor, key_b: Tensor, step: Tensor) -> Tensor:
    """A float64 uniform in (0, 1) per row, a pure function of the row's seed key and step."""
    h = _mix32(_mix32((step + key_b) & _M32) ^ key_a)
    return (h.double() + 0.5) / 2.0**32
