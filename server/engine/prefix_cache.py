"""The prefix cache's keys and index: full blocks of earlier requests' KV, found by what produced them.

A block is `block_tokens` consecutive positions of a sequence. Its KV depends on the tokens at and
before it and on every intervention that acted at or before its last position (an intervention
changes the residual stream at its own positions, and attention carries that to every later
position). So a block's key is a hash chain: the previous block's key, the block's tokens and, once
the request's first intervened position lies inside or before the block, the adapter's identity
(name, version, sha256: a composition names its parts in order) and the positions each of its
interventions acts on within the block. A block wholly before a request's first intervened
position therefore carries the base model's key, and base requests and every adapter whose
interventions start later share it. A block computed under interventions matches only a request
whose own interventions up to the block's end are the same: pyreft's position rules (`positions.py`,
with their capping on short prompts and the split between untied weights) are applied to the
reusing request's own prompt length, so `lN` positions that moved to a longer prompt's end, or a
replaced adapter's new sha256, never match the old blocks. Keys are 16-byte BLAKE2b digests (a
collision would reuse the wrong KV, so not Python's 64-bit `hash`).

`PrefixCache` is only the index: key -> the place of a cached block, least recently used first out.
It owns no memory; the scheduler stores blocks in KV slots it allocates and frees (`kv_cache.py`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True)
class Acting:
    """The interventions a request applies: whose they are, and per intervention its sorted prompt positions."""

    identity: str  # name, version and sha256 of the adapter (or composition)
    locations: tuple[tuple[int, ...], ...]

    @property
    def first(self) -> int:
        """The first intervened position (a large number when none acts, e.g. an empty composition part)."""
        return min((locs[0] for locs in self.locations if locs), default=1 << 62)

    def within(self, start: int, end: int) -> bytes:
        """What the key of the block [start, end) adds: the identity and each intervention's positions in it."""
        parts = [self.identity]
        for locs in self.locations:
            lo, hi = bisect.bisect_left(locs, start), bisect.bisect_left(locs, end)
            parts.append(",".join(map(str, locs[lo:hi])))
        return ";".join(parts).encode()


def acting(identity: str, locations: Sequence[Sequence[int]]) -> Acting:
    return Acting(identity, tuple(tuple(sorted(locs)) for locs in locations))


def block_keys(tokens: Sequence[int], block_tokens: int, acts: Acting | None, *, start: int = 0,
               parent: bytes = b"", keyed_from: int | None = None) -> Iterator[bytes]:
    """The keys of the full blocks of `tokens` from block `start` on (`parent`: the key of the block before).

    `keyed_from` moves the position from which the adapter enters the keys: 0 keys every block by
    adapter, as a LoRA server must (the benchmark's comparison); by default it is the first
    intervened position.
    """
    first = acts.first if acts is not None else None
    if acts is not None and keyed_from is not None:
        first = min(first, keyed_from)
    for block in range(start, len(tokens) // block_tokens):
        lo, hi = block * block_tokens, (block + 1) * block_tokens
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(",".join(map(str, tokens[lo:hi])).encode())
        if first is not None and first < hi:
            digest.update(b"|" + acts.within(lo, hi))
        parent = digest.digest()
        yield parent


class PrefixCache(Generic[P]):
    """Cached blocks by key; `match` finds a prompt's longest cached prefix and keeps it from eviction longest."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, P] = OrderedDict()  # least recently used first
        self.queried_tokens = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of those, found cached (prefix_cache_hits)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def match(self, keys: Sequence[bytes]) -> list[P]:
        """The places of the longest run of `keys` cached from the first, marked used.

        They are marked deepest first, so a chain's first block is its most recently used: eviction
        takes chains from their ends, never leaving a block whose parent is gone (unreachable).
        """
        found: list[P] = []
        for key in keys:
            place = self._blocks.get(key)
            if place is None:
                break
            found.append(place)
        for key in reversed(keys[: len(found)]):
            self._blocks.move_to_end(key)
        return found

    def count(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def insert(self, key: bytes, place: P) -> None:
        """Remember a block computed just now; it counts as the most recently used."""
        self._blocks[key] = place

    def touch(self, key: bytes) -> None:
        self._blocks.move_to_end(key)

    def evict(self, keep: frozenset[bytes] = frozenset()) -> P | None:
        """Forget the least recently used block not in `keep` and return its place to be freed; None if none."""
        for key in self._blocks:
            if key not in keep:
                return self._blocks.pop(key)
        return None

    def clear(self) -> list[P]:
        places = list(self._blocks.values())
        self._blocks.clear()
        return places
