"""Constrained decoding: grammars compiled per constraint, one matcher per constrained row, one batched mask.

The grammar library is xgrammar (the library vLLM and SGLang default to). Both kept libraries
were measured on this CPU (bench/RESULTS.md, 8 schemas, 32 rows): xgrammar fills the 32 rows'
token masks in 0.15 ms per step against llguidance's 4.5 ms, because it precomputes the
context-independent part of every mask at compile time; it compiles in tens of milliseconds
where llguidance takes one, and a compile is paid once per schema (cached here, off the engine
thread) while the mask is paid by every constrained row at every step.

Three parts, one per thread:
- `GrammarCompiler` (any thread): turns a `Constraint` into a `CompiledGrammar` on its own
  worker thread, refuses what the library cannot compile with the library's own message, and
  keeps a bounded LRU of compiles by constraint, so a repeated schema never compiles again and
  concurrent requests with a new schema share one compile.
- `GrammarRows` (the engine thread): one `xgrammar.GrammarMatcher` per constrained Sampler row,
  created when the row joins and dropped when it leaves; each step it fills the bitmask of the
  batch's constrained rows only (`None` when there are none: unconstrained batches pay nothing)
  and then advances each matcher by its row's sampled token.
- `TokenMask`: the bitmask on the model's device; the Sampler applies it before bias, penalties,
  argmax and draws, so greedy and seeded rows alike only ever pick allowed tokens, and a row's
  mask depends on nothing but its own tokens (the seeded-sampling promise holds).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import xgrammar as xgr
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from server.engine.sampling import SamplingParams
from server.engine.structured_schema import exact, unenforced

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")
_SHIFTS = torch.arange(32, dtype=torch.int32)
# Added to a disallowed token's logit: no bias (±100), penalty or temperature brings it back, and its
# probability is exactly 0 after softmax in float32; finite, so that no arithmetic turns it into NaN.
BLOCKED = -1e30
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check's text.
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


class GrammarError(ValueError):
    """A constraint the library cannot compile (an invalid schema, regex or grammar); the message says why."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `spec` is the schema (canonical JSON), the regex, the EBNF
    grammar or the JSON list of choices. Equal constraints share one compile."""

    kind: Kind
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: dict) -> Constraint:
        # Keys keep their order: the output lists properties in the schema's order.
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @property
    def size(self) -> int:
        return len(self.spec.encode())


@dataclass(frozen=True)
class CompiledGrammar:
    constraint: Constraint
    compiled: xgr.CompiledGrammar
    seconds: float  # how long its compile took


class GrammarCompiler:
    """Compiles constraints on its own thread, with a bounded LRU of results keyed by constraint."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int],
                 *, max_entries: int = 128, threads: int = 1, max_spec_bytes: int = 64 * 1024,
                 timeout_s: float = 10.0) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        # The library's own cache is off: this one also shares a compile still under way.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="reft-grammar")
        self._cache: OrderedDict[Constraint, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.max_spec_bytes = max_spec_bytes  # larger schemas, regexes and grammars are refused unread
        self.timeout_s = timeout_s  # a request waits this long for its compile, then is refused
        self.compiles = 0  # compiles started (cache misses)
        self.compile_seconds = 0.0  # time spent in finished compiles

    def compile(self, constraint: Constraint) -> Future[CompiledGrammar]:
        """The constraint's compiled grammar, now if cached, else from the compile thread; a failed compile
        is not kept (its future raises GrammarError)."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            self.compiles += 1
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failed(constraint, f))
        return future

    def cached(self, constraint: Constraint) -> bool:
        with self._lock:
            future = self._cache.get(constraint)
        return future is not None and future.done() and future.exception() is None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _forget_failed(self, constraint: Constraint, future: Future[CompiledGrammar]) -> None:
        if future.cancelled() or future.exception() is None:
            return
        with self._lock:
            if self._cache.get(constraint) is future:
                del self._cache[constraint]

    def _compile(self, constraint: Constraint) -> CompiledGrammar:
        started = time.perf_counter()
        c, spec = self._compiler, constraint.spec
        try:
            if constraint.kind == "json_object":
                # Not strict: an object with any properties (strict mode would allow only {}).
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"),
                                                   strict_mode=False)
            elif constraint.kind == "json_schema":
                # Compact JSON: with free whitespace a small model may emit newlines until max_tokens.
                schema = json.loads(spec)
                compiled = c.compile_json_schema(json.dumps(exact(schema)), any_whitespace=False,
                                                 separators=(",", ":"))
                why = unenforced(schema)
                if why:
                    raise GrammarError(why)
            elif constraint.kind == "regex":
                compiled = c.compile_regex(spec)
            elif constraint.kind == "choice":
                compiled = c.compile_grammar(_choice_grammar(json.loads(spec)))
            else:
                compiled = c.compile_grammar(spec)
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001 - the library reports bad input as RuntimeError; say what it said
            raise GrammarError(library_message(exc)) from None
        seconds = time.perf_counter() - started
        with self._lock:
            self.compile_seconds += seconds
        return CompiledGrammar(constraint, compiled, seconds)


def conflict(params: SamplingParams) -> str | None:
    """Why these stopping rules cannot go with a structured output (None if they can): the grammar alone says
    where the answer ends, so nothing may end it earlier (a stop string or token inside it would cut it short of
    the grammar) or later (ignore_eos)."""
    if params.ignore_eos:
        return "ignore_eos cannot be combined with a structured output: the grammar ends at EOS"
    if params.stop:
        return (f"stop cannot be combined with a structured output: the answer ends where its grammar does, and a "
                f"stop string inside it would cut it short ({len(params.stop)} stop strings given)")
    if params.stop_token_ids:
        return (f"stop_token_ids cannot be combined with a structured output: the answer ends where its grammar "
                f"does ({len(params.stop_token_ids)} stop tokens given)")
    return None


def library_message(exc: BaseException) -> str:
    """xgrammar's error without its timestamp, source location and check text."""
    lines = [_LOCATION.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


def _choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly `choices`: each one a string literal (JSON's escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in choices)


@dataclass(frozen=True)
class TokenMask:
    """Allowed tokens of some rows of a batch: `rows` [k] index the batch, `bits` [k, ceil(V/32)] int32 bitmask."""

    rows: Tensor
    bits: Tensor

    def apply(self, scores: Tensor) -> Tensor:
        """scores [B, V] with every disallowed token of the masked rows pushed to BLOCKED (a new tensor; the other
        rows as given).

        Arithmetic, not masked_fill or where: on this CPU both run a scalar loop, 13 ms for 16 rows of
        49,152 tokens, against 1.5 ms for unpack, subtract and index_add (bench/RESULTS.md).
        """
        k, words = self.bits.shape
        blocked = (((self.bits[:, :, None] >> _SHIFTS.to(self.bits.device)) & 1) ^ 1).view(k, words * 32)
        blocked = blocked[:, : scores.shape[-1]].to(scores.dtype)
        return scores.index_add(0, self.rows, blocked, alpha=BLOCKED)


def reference_mask(matcher: xgr.GrammarMatcher, vocab_size: int) -> Tensor:
    """One matcher's allowed tokens as a bool [V] (the library's own bitmask, unpacked one bit at a time): what
    `TokenMask.apply`'s vectorised unpacking is tested against."""
    bits = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bits, 0)
    words = bits[0].tolist()
    return torch.tensor([(words[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab_size)])


class GrammarRows:
    """The engine thread's matchers, one per constrained Sampler row; nothing outlives its row."""

    def __init__(self, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._matchers: dict[int, xgr.GrammarMatcher] = {}

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, row: int) -> bool:
        return row in self._matchers

    def add(self, row: int, grammar: CompiledGrammar) -> None:
        if row in self._matchers:
            raise ValueError(f"row {row} already has a grammar")
        # The engine's stop tokens, not the tokenizer's EOS: a grammar ends where generation ends.
        self._matchers[row] = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=self.stop_token_ids)

    def remove(self, row: int) -> None:
        self._matchers.pop(row, None)

    def mask(self, rows: Sequence[int], device: torch.device) -> TokenMask | None:
        """The allowed tokens of the constrained rows among `rows` (a batch's rows, in order); None if none is."""
        if not self._matchers:
            return None
        batch = [(i, self._matchers[row]) for i, row in enumerate(rows) if row in self._matchers]
        if not batch:
            return None
        bits = xgr.allocate_token_bitmask(len(batch), self.vocab_size)
        for k, (_, matcher) in enumerate(batch):
            matcher.fill_next_token_bitmask(bits, k)
        index = torch.tensor([i for i, _ in batch], dtype=torch.long)
        return TokenMask(index.to(device), bits.to(device))

    def accept(self, row: int, token: int) -> bool:
        """Advance the row's matcher by its sampled token; False if the grammar refuses it (True if unconstrained)."""
        matcher = self._matchers.get(row)
        return matcher is None or matcher.accept_token(token)
