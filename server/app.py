"""The HTTP adapter: build_app(async_engine, ...) -> FastAPI. No module state; everything an app
needs (engine, metrics registry, serving logic) hangs off the closure built here.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/moe/stats,
GET /health, GET /metrics. The app's lifespan starts and stops the AsyncEngine's thread.
Every error is an OpenAI-style body; bad input is a 4xx, never a 500.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_rt.errors import MoeRtError

from .async_engine import AsyncEngine, EngineUnavailable, Overloaded
from .errors import ApiError, validation_error
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import ClientGone, OpenAIServing

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/moe/stats", "/health", "/metrics"}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Gate:
    """Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass untouched):
    counts every response by endpoint and status, checks the bearer key on /v1/*, and reads at
    most max_bytes of a request body (413 beyond, chunked uploads included) before replaying it
    to the app, so the app never sees more."""

    def __init__(self, app, *, metrics: ServerMetrics, api_key: str | None, max_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted_send(msg):
            if msg["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(msg["status"])).inc()
            await send(msg)

        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                e = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
                return await _error_response(e)(scope, receive, counted_send)
        too_big = ApiError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(too_big)(scope, receive, counted_send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await _error_response(too_big)(scope, receive, counted_send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        return await self.app(scope, replay, counted_send)


def build_app(
    async_engine: AsyncEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    metrics = ServerMetrics(async_engine)
    serving = OpenAIServing(async_engine, model_name, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="moe-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error_response(ApiError(500, "internal server error", "server_error"))

    def to_api_error(e: Exception) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, MoeRtError):
            return ApiError(400, str(e))
        if isinstance(e, Overloaded):
            return ApiError(429, str(e), "server_overloaded", code="queue_full", headers={"Retry-After": str(e.retry_after)})
        if isinstance(e, EngineUnavailable):
            return ApiError(503, str(e), "server_error", code="engine_unavailable")
        raise e

    app.add_middleware(_Gate, metrics=metrics, api_key=api_key, max_bytes=max_body_bytes)

    async def parse(request: Request, model):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def disconnect_waiter(request: Request):
        async def wait():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return wait

    async def respond(result):
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(result.model_dump())

    # -- routes ---------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        try:
            return await respond(await serving.completions(req, disconnect_waiter(request)))
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise to_api_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        try:
            return await respond(await serving.chat(req, disconnect_waiter(request)))
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise to_api_error(e) from None

    @app.get("/v1/models")
    async def models():
        ctx = async_engine.engine.max_model_len if async_engine.ready else None
        return JSONResponse(ModelList(data=[ModelCard(id=model_name, created=created, max_model_len=ctx)]).model_dump())

    @app.get("/v1/moe/stats")
    async def moe_stats():
        stats = await async_engine.moe_stats()
        if not stats:
            return JSONResponse({"note": "no MoE statistics are exposed yet (no expert cache, predictor or "
                                         "expert parallelism registered a source)"})
        return JSONResponse(stats)

    @app.get("/health")
    async def health():
        if async_engine.ready:
            return JSONResponse({"status": "ok"})
        reason = async_engine.error or "the model is loading"
        return _error_response(ApiError(503, reason, "server_error", code="engine_unavailable"))

    @app.get("/metrics")
    async def prometheus():
        metrics.moe_stats = await async_engine.moe_stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
