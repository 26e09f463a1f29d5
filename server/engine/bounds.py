"""The valid range of each sampling parameter, written once.

The API's request models declare them (as pydantic constraints, so the OpenAPI schema shows them,
or checked when a request becomes `SamplingParams`), and the sampler refuses a row outside them,
whoever built it. Ranges are finite-valued: NaN and infinities lie in none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A closed range [low, high], open at `low` when `open_low`; `high` may be infinite (no upper bound)."""

    name: str
    low: float
    high: float = math.inf
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"({self.low:g}, {self.high:g}]" if self.open_low else f"{self.low:g}..{self.high:g}"

    def refusal(self, value: float, name: str | None = None) -> str:
        """Why `value` is refused, with the range; `name` where the request spells the parameter otherwise."""
        where = f"be a finite number {self}" if math.isinf(self.high) else f"lie in {self}"
        return f"{name or self.name} must {where}; got {value}"

    def constraints(self) -> dict[str, float]:
        """The range as pydantic `Field` keywords."""
        bounds = {"gt" if self.open_low else "ge": self.low}
        return bounds | ({} if math.isinf(self.high) else {"le": self.high})


TEMPERATURE = Range("temperature", 0.0, 100.0)  # 0 = greedy
TOP_P = Range("top_p", 0.0, 1.0, open_low=True)
TOP_K = Range("top_k", 0)  # 0 = off
PRESENCE_PENALTY = Range("presence_penalty", -2.0, 2.0)  # as in OpenAI's API
FREQUENCY_PENALTY = Range("frequency_penalty", -2.0, 2.0)
REPETITION_PENALTY = Range("repetition_penalty", 0.0, 100.0, open_low=True)  # divides positive logits
MAX_LOGPROBS = 20  # most top alternatives a row may ask for, as OpenAI allows
LOGPROBS = Range("logprobs", 0, MAX_LOGPROBS)
PROMPT_LOGPROBS = Range("prompt_logprobs", 0, MAX_LOGPROBS)
