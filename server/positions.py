"""pyreft's position rules: which prompt positions each intervention of an adapter acts on.

`fN`, `lN`, `fN+lN`: the first N / last N prompt tokens, each count capped at prompt_length // 2
(pyreft's `get_intervention_locations`). With shared weights, or when one side is empty after
capping, every intervention acts on all chosen positions. Otherwise the first half of the
interventions (in adapter order) takes the prefix positions and the second half the suffix.
pyreft pads short lists with a dummy position; the dummy is never a real prompt token, so we
simply leave it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_POSITIONS = re.compile(r"^(?:f(\d+)\+l(\d+)|f(\d+)|l(\d+))$")
MAX_POSITION_COUNT = 4096


class PositionsError(ValueError):
    """A positions string that is not fN, lN or fN+lN."""


@dataclass(frozen=True)
class Positions:
    first: int
    last: int

    @staticmethod
    def parse(text: str) -> Positions:
        m = _POSITIONS.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise PositionsError(f"positions must look like 'f3', 'l3' or 'f3+l3', got {text!r}")
        f_both, l_both, f_only, l_only = m.groups()
        if max(len((g or "").lstrip("0")) for g in m.groups()) > len(str(MAX_POSITION_COUNT)):  # int() of 4,301+ raises
            raise PositionsError(f"positions {text[:32]!r}...: counts above {MAX_POSITION_COUNT} are not supported")
        first = int(f_both or f_only or 0)
        last = int(l_both or l_only or 0)
        if first + last == 0:
            raise PositionsError(f"positions {text!r} select no prompt token")
        if max(first, last) > MAX_POSITION_COUNT:
            raise PositionsError(f"positions {text!r}: counts above {MAX_POSITION_COUNT} are not supported")
        return Positions(first, last)

    def __str__(self) -> str:
        if self.first and self.last:
            return f"f{self.first}+l{self.last}"
        return f"f{self.first}" if self.first else f"l{self.last}"

    def locations(self, prompt_length: int, num_interventions: int, share_weights: bool) -> list[list[int]]:
        """For each intervention (adapter order), the prompt positions it acts on."""
        first = min(prompt_length // 2, self.first)
        last = min(prompt_length // 2, self.last)
        prefix = list(range(first))
        suffix = list(range(prompt_length - last, prompt_length))
        if share_weights or first == 0 or last == 0:
            return [prefix + suffix] * num_interventions
        half = num_interventions // 2
        return [prefix] * half + [suffix] * (num_interventions - half)
