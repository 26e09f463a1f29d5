"""Between HTTP and the engine: resolve adapters, tokenize, submit, and turn events into results.

Nothing here knows about routes or status codes beyond `ServingError.status`; the routers build
responses, the engine never sees HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from server import tokens
from server.adapter_file import AdapterError, Composite, composition, validate_name
from server.api.token_bytes import TokenBytes
from server.engine.adapter_cache import AdapterRef
from server.engine.output import Event
from server.engine.sampling import SamplingParams, TokenLogprobs
from server.engine.scheduler import EngineError, GenerationRequest
from server.engine.structured import CompiledGrammar, Constraint, GrammarError
from server.metrics import UNKNOWN_LABEL, Metrics
from server.registry import UnknownAdapter
from server.torch_threads import in_own_thread

if TYPE_CHECKING:  # the composition root builds the Engine and hands it down; serving never builds one
    from server.bootstrap import Engine

BASE_ALIASES = ("base",)
TOKENIZER_THREADS = 2  # fast tokenizers release the GIL: tokenising never stalls the event loop
ENGINE_CHECK_SECONDS = 1.0  # how often a waiting request checks that the engine thread still runs


class ServingError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass(frozen=True)
class Limits:
    """What a request's parameters are checked against that only the running server knows."""

    max_new_tokens: int  # REFT_MAX_NEW_TOKENS
    max_context: int  # the model's: a request's prompt and output together
    vocab_size: int


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's tokens, those reused from the prefix cache
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per generated token, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., when asked for (echo)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def derived_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's own for the first, a hash of (seed, index) for the others, so the n
    samples differ from each other and the same request gives the same n again."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class Serving:
    """Touched only from the event loop (its counters need no lock); the engine is reached through its
    thread-safe `submit`, files and tokenizers through threads."""

    def __init__(self, engine: Engine, metrics: Metrics, max_prompt_logprobs: int) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.training = engine.training
        self.metrics = metrics
        self.tokenizer = engine.base.tokenizer
        self.model_id = engine.base.model_id
        self.vocab_size = int(engine.base.model.config.vocab_size)
        self.limits = Limits(engine.max_new_tokens, engine.loop.max_context, self.vocab_size)
        self.tokens = TokenBytes(self.tokenizer)
        self.max_prompt_logprobs = max_prompt_logprobs
        self.draining = False
        self.preparing = 0  # requests admitted but not yet submitted: resolving their adapter, tokenising
        self._loads: dict[tuple[str, int | None], asyncio.Future[AdapterRef]] = {}  # adapter reads in flight
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="reft-tokenize")

    @property
    def alive(self) -> bool:
        """False once the engine thread has died: readiness and liveness report it."""
        return self.engine.loop.alive

    # ---- names and prompts ------------------------------------------------------------------

    def new_adapter_name(self, name: str, replace: bool, taken: ServingError | None = None) -> str:
        """`name`, checked to be a valid adapter name that is free unless `replace` is asked for.

        A name taken is refused with `taken`, by default a 409 that says how to replace it. The registry
        refuses again (`AdapterExists`) if another request takes the name before this one stores its adapter.
        """
        validate_name(name)
        if name in self.registry and not replace:
            raise taken or ServingError(409, f"adapter {name!r} exists; pass replace=true to replace it",
                                        "conflict_error")
        return name

    def adapter_name(self, model: str | None) -> str | None:
        """OpenAI's `model` (or /generate's `adapter`) → adapter name, None for the base model."""
        if model is None or model == self.model_id or model in BASE_ALIASES:
            return None
        return model

    async def resolve(self, name: str | list[str] | None) -> AdapterRef | None:
        """An adapter name, or several composed ("a+b", ["a", "b"]) → the versions the request pins."""
        if name is None:
            return None
        try:
            names = composition(name)
        except AdapterError as exc:
            raise ServingError(400, str(exc)) from None
        if len(names) == 1:
            return await self._resolve_one(names[0])
        refs = [await self._resolve_one(n) for n in names]
        return AdapterRef("+".join(names), max(r.version for r in refs), Composite(tuple(r.adapter for r in refs)),
                          "+".join(r.sha256 for r in refs))

    async def _resolve_one(self, name: str) -> AdapterRef:
        """The adapter's current version; requests that need the same uncached version share one read."""
        registry = self.registry
        try:
            return registry.cached(name) or await asyncio.shield(self._load(name))
        except UnknownAdapter:
            raise ServingError(
                404, f"adapter or model {name!r} does not exist; GET /v1/models lists them", "not_found_error"
            ) from None
        except (AdapterError, FileNotFoundError) as exc:
            raise ServingError(404, f"adapter {name!r} is not available: {exc}", "not_found_error") from None

    def _load(self, name: str) -> asyncio.Future[AdapterRef]:
        """The read of `name`'s current version from the registry, started unless one is in flight already.

        Shielded by the caller: a client that leaves does not cancel the read others wait for.
        """
        registry = self.registry
        try:
            key = (name, registry.get(name).version)
        except UnknownAdapter:  # perhaps uploaded through another replica a moment ago: resolve looks again
            key = (name, None)
        load = self._loads.get(key)
        if load is None:
            self.metrics.adapter_loads.inc()
            load = asyncio.ensure_future(in_own_thread(registry.resolve, name))
            self._loads[key] = load
            load.add_done_callback(lambda done: self._load_done(key, done))
        return load

    def _load_done(self, key: tuple[str, int | None], load: asyncio.Future[AdapterRef]) -> None:
        if self._loads.get(key) is load:
            del self._loads[key]
        if not load.cancelled():
            load.exception()  # retrieved: every waiter may have left

    def check_capacity(self, endpoint: str) -> None:
        """Refuse with 503/429 before any work is spent on a request that the engine would refuse anyway.

        Requests still being prepared (`admitted`) count as queued: tokenising and reading adapters is
        work too, and a burst must not start more of it than the queue can take.
        Refusals are counted under the adapter label "unknown": they may come before the body is read.
        """
        engine_loop = self.engine.loop
        room = engine_loop.room
        if self.draining or not engine_loop.alive:
            reason = "the server is shutting down" if self.draining else "the engine stopped"
            error = ServingError(503, reason, "unavailable", {"Retry-After": "5"})
        elif engine_loop.num_waiting + self.preparing >= room:
            error = ServingError(429, f"the queue is full ({engine_loop.num_waiting} requests waiting and "
                                      f"{self.preparing} being prepared, of {room}); retry shortly",
                                 "overloaded", {"Retry-After": "1"})
        else:
            return
        self.metrics.requests.labels(endpoint, UNKNOWN_LABEL, str(error.status)).inc()
        raise error

    @contextmanager
    def admitted(self, endpoint: str) -> Iterator[None]:
        """Admit a request to its preparation (adapter, tokens, parameters), counted toward the 429 limit until
        it leaves; submit its choices after leaving, with no await between, so it is never counted twice."""
        self.check_capacity(endpoint)
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; text is tokenised on the tokenizer threads, off the event loop."""
        if isinstance(prompt, str) and prompt:
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._encode, prompt)
        return self._encode(prompt)

    async def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._chat_ids, messages, tools)

    async def grammar(self, constraint: Constraint | None) -> CompiledGrammar | None:
        """The constraint compiled (off the event loop and the engine thread), before the request is queued:
        an invalid, too large or too slow one is refused here with a 400/413 that says why."""
        if constraint is None:
            return None
        compiler = self.engine.grammars
        what = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex",
                "choice": "choice list", "grammar": "grammar"}[constraint.kind]
        if constraint.size > compiler.max_spec_bytes:
            raise ServingError(413, f"the {what} is {constraint.size} bytes; this server accepts at most "
                                    f"{compiler.max_spec_bytes} (REFT_MAX_GRAMMAR_BYTES)")
        # Shielded: a request that gives up must not cancel a compile that others may share.
        waiting = asyncio.shield(asyncio.wrap_future(compiler.compile(constraint)))
        try:
            grammar = await asyncio.wait_for(waiting, compiler.timeout_s)
        except GrammarError as exc:
            raise ServingError(400, f"invalid {what}: {exc}") from None
        except TimeoutError:
            raise ServingError(400, f"compiling the {what} took longer than {compiler.timeout_s:g} s "
                                    "(REFT_GRAMMAR_COMPILE_SECONDS); simplify it") from None
        return grammar

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if not prompt:
            raise ServingError(400, "the prompt is empty")
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ServingError(400, f"token ids must lie in 0..{self.vocab_size - 1}; got {bad[:5]}")
            return list(prompt)
        return tokens.text_ids(self.tokenizer, _checked_text(prompt))

    def _chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if not tokens.has_chat_template(self.tokenizer):
            raise ServingError(400, f"the base model {self.model_id!r} has no chat template; use /v1/completions")
        try:
            text = tokens.render_chat(self.tokenizer, messages, tools)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
            raise ServingError(400, f"the chat template rejected these messages: {exc}") from exc
        return tokens.rendered_ids(self.tokenizer, _checked_text(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- running ----------------------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, ref: AdapterRef | None, endpoint: str,
        until_disconnect: Callable[[], Awaitable[object]] | None = None, grammar: CompiledGrammar | None = None,
    ) -> Submission:
        """Hand one request to the engine now, so refusals (400, 429) come before any response starts.

        `until_disconnect` returns once the client has gone; the request is then cancelled at once,
        whether or not anyone is reading its events yet (its slot is free before the next step).
        """
        self.check_capacity(endpoint)
        return Submission(self, prompt_ids, params, ref, endpoint, until_disconnect, grammar)

    def fan_out(
        self, prompts: list[list[int]], params: SamplingParams, copies: int, ref: AdapterRef | None, endpoint: str,
        until_disconnect: Callable[[], Awaitable[object]] | None = None, grammar: CompiledGrammar | None = None,
    ) -> list[Submission]:
        """Submit `copies` independent choices of each prompt (seeds derived per copy); choice i*copies + j is
        prompt i's copy j. All or nothing: if one is refused (429), those already submitted are cancelled."""
        if params.prompt_logprobs is not None:  # each choice echoes its prompt with logprobs
            count, width = sum(len(ids) for ids in prompts), params.prompt_logprobs + 1
            if count * copies * width > self.max_prompt_logprobs:
                raise ServingError(400, f"echo with logprobs={params.prompt_logprobs} returns {count} prompt tokens "
                                        f"x {copies} choices x {width} logprobs = {count * copies * width}; this "
                                        f"server returns at most {self.max_prompt_logprobs} per request "
                                        f"(REFT_MAX_PROMPT_LOGPROBS)")
        submissions: list[Submission] = []
        try:
            for ids in prompts:
                for j in range(copies):
                    choice = replace(params, seed=derived_seed(params.seed, j))
                    submissions.append(self.submit(ids, choice, ref, endpoint, until_disconnect, grammar))
        except BaseException:
            for submission in submissions:
                submission.close()
            raise
        return submissions

    async def complete(
        self, prompt_ids: list[int], params: SamplingParams, ref: AdapterRef | None, endpoint: str,
        until_disconnect: Callable[[], Awaitable[object]] | None = None, grammar: CompiledGrammar | None = None,
    ) -> Result:
        return await self.submit(prompt_ids, params, ref, endpoint, until_disconnect, grammar).result()

    async def complete_all(self, submissions: list[Submission]) -> list[Result]:
        """Every submission's result, in order; if one fails, the others are cancelled and its error raised."""
        tasks = [asyncio.ensure_future(s.result()) for s in submissions]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task, submission in zip(tasks, submissions, strict=True):
                task.cancel()
                submission.close()
            raise

    @staticmethod
    async def merged(submissions: list[Submission]) -> AsyncIterator[tuple[int, Event]]:
        """The submissions' events as they come, tagged with the submission's index (a stream of n choices)."""
        if len(submissions) == 1:  # the common case, without the relay
            async for event in submissions[0].events():
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Event | None, BaseException | None]] = asyncio.Queue()

        async def relay(index: int, submission: Submission) -> None:
            try:
                async for event in submission.events():
                    queue.put_nowait((index, event, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((index, None, exc))
                return
            queue.put_nowait((index, None, None))

        tasks = [asyncio.ensure_future(relay(i, s)) for i, s in enumerate(submissions)]
        try:
            remaining = len(tasks)
            while remaining:
                index, event, error = await queue.get()
                if error is not None:
                    raise error
                if event is None:
                    remaining -= 1
                    continue
                yield index, event
        finally:
            for task, submission in zip(tasks, submissions, strict=True):
                task.cancel()
                submission.close()


def _checked_text(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer accepts: refuse them as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServingError(400, f"the prompt is not valid Unicode: {exc.reason} at character {exc.start}") from None
    return text


class Submission:
    """One submitted request: its events arrive from the engine thread through an asyncio queue."""

    def __init__(
        self, serving: Serving, prompt_ids: list[int], params: SamplingParams, ref: AdapterRef | None, endpoint: str,
        until_disconnect: Callable[[], Awaitable[object]] | None = None, grammar: CompiledGrammar | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.metrics = serving.metrics
        self.engine_loop = serving.engine.loop
        self.endpoint = endpoint
        self.label = serving.metrics.adapter_label(ref.name if ref else None)
        self.request = GenerationRequest(
            prompt_ids, params, ref, on_event=lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e),
            grammar=grammar,
        )
        try:
            serving.engine.loop.submit(self.request)
        except EngineError as exc:
            self.metrics.requests.labels(endpoint, self.label, str(exc.status)).inc()
            headers = {"Retry-After": "1"} if exc.status == 429 else {}
            raise ServingError(exc.status, str(exc), exc.kind, headers) from None
        self.start = time.monotonic()
        self.watcher: asyncio.Task | None = None
        if until_disconnect is not None:
            self.watcher = loop.create_task(until_disconnect())
            self.watcher.add_done_callback(self._client_gone)

    def _client_gone(self, watcher: asyncio.Task) -> None:
        if not watcher.cancelled():
            self.request.cancel()

    def close(self) -> None:
        """Cancel the request (a no-op once it has finished) and stop watching its client."""
        self.request.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    async def result(self) -> Result:
        """The whole answer, gathered from the events."""
        result = Result(prompt_tokens=len(self.request.prompt_ids))
        async for event in self.events():
            result.text += event.text
            result.token_ids.extend(event.token_ids)
            result.logprobs.extend(event.logprobs)
            if event.prompt_logprobs is not None:
                result.prompt_logprobs = list(event.prompt_logprobs)
            result.finish_reason = event.finish_reason
            result.completion_tokens = event.completion_tokens
            result.cached_tokens = event.cached_tokens
        if result.finish_reason is None:
            raise ServingError(499, "the client went away", "cancelled")
        return result

    async def events(self) -> AsyncIterator[Event]:
        """Yield the request's events until it finishes; cancel it if the consumer goes away."""
        first = True
        status = "499"
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), ENGINE_CHECK_SECONDS)
                except TimeoutError:
                    if not self.engine_loop.alive:
                        status = "503"
                        raise ServingError(503, "the engine stopped", "unavailable") from None
                    continue
                if first and event.token_ids:
                    self.metrics.ttft.labels(self.label).observe(time.monotonic() - self.start)
                    first = False
                if event.finish_reason == "error":
                    status = str(event.error_status)
                    if event.error_status == 503:
                        raise ServingError(503, event.error or "the engine stopped", "unavailable")
                    raise ServingError(500, f"generation failed: {event.error}", "server_error")
                if event.finish_reason == "cancelled":
                    return
                yield event
                if event.finish_reason is not None:
                    status = "200"
                    self.metrics.latency.labels(self.label).observe(time.monotonic() - self.start)
                    self.metrics.prompt_tokens.labels(self.label).inc(event.prompt_tokens)
                    self.metrics.generation_tokens.labels(self.label).inc(event.completion_tokens)
                    return
        finally:
            self.close()
            self.metrics.requests.labels(self.endpoint, self.label, status).inc()
