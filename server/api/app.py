"""The FastAPI app: lifespan (background model load), error handlers, middleware, routers."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapter_file import AdapterError
from server.api import (
    routes_adapters,
    routes_generate,
    routes_health,
    routes_lora,
    routes_openai,
    routes_train,
    routes_ui,
)
from server.api.errors import error_response
from server.api.middleware import AccessLog, RequestGate
from server.api.serving import Serving, ServingError
from server.bootstrap import Engine, build_engine
from server.config import Settings
from server.metrics import Metrics
from server.registry import AdapterExists, AdapterTooLarge, ReadOnlyRegistry, UnknownAdapter
from server.torch_threads import run_in_own_thread

log = logging.getLogger(__name__)

# Every router of the API: RequestGate checks each call against these routes' declared access.
ROUTERS = (routes_health.router, routes_openai.router, routes_generate.router, routes_train.router,
           routes_adapters.router, routes_lora.router)


class AppState:
    """What routes reach through `request.app.state.reft`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.serving: Serving | None = None
        self.load_error: str | None = None
        self.draining = False
        self._stop = threading.Event()

    def load(self, factory: Callable[[Settings], Engine]) -> None:
        """The loader thread: build the engine, serve it, then rescan the registry until closed."""
        engine = self._build(factory)
        if engine is None:
            return
        self._wire_metrics(engine)
        self._serve(engine)
        self._scan(engine)

    def _build(self, factory: Callable[[Settings], Engine]) -> Engine | None:
        try:
            return run_in_own_thread(factory, self.settings)
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log
            log.exception("start-up failed")
            self.load_error = str(exc)
            return None

    def _wire_metrics(self, engine: Engine) -> None:
        view = self.metrics.view
        view.engine = engine.loop.stats
        view.max_batch_size = engine.loop.max_batch_size
        view.max_lora = engine.loop.max_batch_size  # any mix of adapters shares a batch
        view.resident_adapters = lambda: len(engine.adapter_cache)
        view.gpu_adapters = engine.adapter_cache.resident
        view.cpu_adapters = engine.registry.host_resident
        engine.adapter_cache.on_load.append(self.metrics.adapter_load_seconds.observe)
        view.registered_adapters = lambda: len(engine.registry)
        view.rejected_files = lambda: len(engine.registry.rejected())
        view.rejections = lambda: engine.registry.rejections
        view.adapter_cache_hits = lambda: engine.adapter_cache.hits
        view.adapter_cache_misses = lambda: engine.adapter_cache.misses
        view.grammar_compiles = lambda: engine.grammars.compiles
        view.grammar_compile_seconds = lambda: engine.grammars.compile_seconds
        prefix, kv = engine.loop.prefix, engine.loop.runner.cache
        view.prefix_caching = prefix is not None
        view.block_size = prefix.block_tokens if prefix is not None else kv.block_tokens
        view.num_blocks = kv.capacity // view.block_size

    def _serve(self, engine: Engine) -> None:
        """Routes see the engine from here on: /health turns 200."""
        self.engine = engine
        self.serving = Serving(engine, self.metrics, self.settings.max_prompt_logprobs)
        self.serving.draining = self.draining
        log.info("ready: %s with %d adapters, loaded in %.1fs", engine.base.model_id, len(engine.registry),
                 engine.load_seconds)

    def _scan(self, engine: Engine) -> None:
        """Rescan the registry directory every `scan_interval` seconds (0: never) until the app closes."""
        interval = self.settings.scan_interval
        while interval > 0 and not self._stop.wait(interval):
            try:
                run_in_own_thread(engine.registry.scan)
            except Exception:  # noqa: BLE001 - a failed pass never ends scanning: the next one runs
                log.exception("registry scan failed")
                self.metrics.scan_failures.inc()

    def drain(self) -> None:
        """Shutdown has begun: refuse new requests with 503 (readiness too); running ones go on."""
        self.draining = True
        if self.serving is not None:
            self.serving.draining = True

    def close(self) -> None:
        self._stop.set()
        if self.serving is not None:
            self.serving.close()
        if self.engine is not None:
            self.engine.loop.stop()


def create_app(settings: Settings, engine_factory: Callable[[Settings], Engine] = build_engine) -> FastAPI:
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, args=(engine_factory,), name="reft-loader", daemon=True)
        loader.start()
        yield
        state.close()

    app = FastAPI(
        title="reft-serve", version="0.1.0", lifespan=lifespan,
        description="Serve many ReFT interventions on one frozen base model, batched together.",
    )
    app.state.reft = state

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return error_response(400, f"invalid adapter: {exc}")

    @app.exception_handler(AdapterExists)
    async def adapter_exists(request: Request, exc: AdapterExists) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(AdapterTooLarge)
    async def adapter_too_large(request: Request, exc: AdapterTooLarge) -> JSONResponse:
        return error_response(413, str(exc))

    @app.exception_handler(ReadOnlyRegistry)
    async def read_only_registry(request: Request, exc: ReadOnlyRegistry) -> JSONResponse:
        return error_response(403, str(exc), "permission_error")

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(request: Request, exc: UnknownAdapter) -> JSONResponse:
        return error_response(404, f"adapter {exc.args[0]!r} does not exist")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(routes_ui.router)  # the playground's static files: no key, not part of the API's schema
    app.add_middleware(RequestGate, settings=settings, routes=[r for router in ROUTERS for r in router.routes])
    app.add_middleware(AccessLog)
    return app
