"""The HTTP adapter: build_app(async_engine, ...) -> FastAPI. No module state; everything an app
needs (engine, metrics registry, serving logic) hangs off the closure built here.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /v1/moe/stats, POST /tokenize, POST /detokenize, GET /version, GET /health, GET /metrics,
and (unless docs=False) GET /openapi.json and /docs. The app's lifespan starts and stops the
AsyncEngine's thread and the periodic stats log. Every error is an OpenAI-style body; bad input
is a 4xx, never a 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_rt.version import version as package_version

from .config import DEFAULT_MAX_BODY_BYTES, DEFAULT_STATS_INTERVAL_S, ServerConfig
from . import openapi
from .async_engine import AsyncEngine
from .errors import ApiError, model_not_found, validation_error
from .gate import Gate, error_response
from .json_body import load_json_object
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, VersionResponse,
)
from .serving import ClientGone, OpenAIServing
from .serving_tokens import TokenServing
from .stats_log import log_stats_forever

log = logging.getLogger(__name__)



def build_app(
    async_engine: AsyncEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    docs: bool = True,
    access_log: bool = True,
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S,
    on_engine_death: Callable[[], None] | None = None,
) -> FastAPI:
    """Options are ServerConfig's (server_options turns one into these keywords).
    docs: serve /openapi.json and /docs. access_log: one INFO line per request on the
    `server.access` logger. stats_interval_s: the throughput line on `server.stats` every so many
    seconds (0: never). on_engine_death: called on the event loop once the engine is dead for good
    (model load failed or the engine loop crashed), after in-flight requests got their error; the
    CLI stops the server so that a supervisor restarts it."""
    metrics = ServerMetrics(async_engine)
    serving = OpenAIServing(async_engine, model_name, metrics)
    tokens = TokenServing(async_engine, model_name)
    created = int(time.time())

    def engine_died() -> None:
        log.error("the engine is dead (%s)%s", async_engine.error,
                  "; stopping the server" if on_engine_death is not None else "; every request gets 503 from now on")
        if on_engine_death is not None:
            on_engine_death()

    async_engine.on_death(engine_died)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await async_engine.start()
        stats_task = asyncio.create_task(log_stats_forever(async_engine, stats_interval_s)) if stats_interval_s > 0 else None
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stats_task
            await async_engine.shutdown()

    app = FastAPI(title="moe-rt", version=package_version(), lifespan=lifespan,
                  description="OpenAI-compatible serving of Mixture-of-Experts models (docs/server.md)",
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    openapi.install(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest])

    # -- errors (an exception nothing here handles becomes a counted 500 in the Gate) -------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), "invalid_request_error", headers=e.headers))

    app.add_middleware(Gate, metrics=metrics, api_key=api_key, max_bytes=max_body_bytes, access_log=access_log)

    async def parse(request: Request, model):
        data = load_json_object(await request.body())
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

    async def generate(request: Request, model, run):
        req = await parse(request, model)
        try:
            return await respond(await run(req, disconnect_waiter(request)))
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise serving.fail(e) from None

    async def answer(request: Request, model, run):
        req = await parse(request, model)
        try:
            return JSONResponse((await run(req)).model_dump())
        except Exception as e:
            raise serving.fail(e) from None

    # -- routes ---------------------------------------------------------------------------------
    generation_errors = openapi.errors(400, 401, 404, 413, 429, 500, 503)

    @app.post("/v1/completions", openapi_extra=openapi.json_body(CompletionRequest), responses={
        200: {"model": CompletionResponse, "content": openapi.sse("stream=true: CompletionResponse chunks, then [DONE]")},
        **generation_errors})
    async def completions(request: Request):
        return await generate(request, CompletionRequest, serving.completions)

    @app.post("/v1/chat/completions", openapi_extra=openapi.json_body(ChatCompletionRequest), responses={
        200: {"model": ChatCompletionResponse, "content": openapi.sse("stream=true: chat.completion.chunk events, then [DONE]")},
        **generation_errors})
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest, serving.chat)

    def model_card() -> ModelCard:
        ctx = async_engine.engine.max_model_len if async_engine.ready else None
        return ModelCard(id=model_name, created=created, max_model_len=ctx)

    @app.get("/v1/models", response_model=ModelList, responses=openapi.errors(401))
    async def models():
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=openapi.errors(401, 404), openapi_extra={
        "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]})
    async def model(request: Request):
        if request.path_params["model_id"] != model_name:
            raise model_not_found(request.path_params["model_id"], model_name)
        return JSONResponse(model_card().model_dump())

    @app.post("/tokenize", response_model=TokenizeResponse, openapi_extra=openapi.json_body(TokenizeRequest),
              responses=openapi.errors(400, 401, 404, 413, 503))
    async def tokenize(request: Request):
        return await answer(request, TokenizeRequest, tokens.tokenize)

    @app.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=openapi.json_body(DetokenizeRequest),
              responses=openapi.errors(400, 401, 404, 413, 503))
    async def detokenize(request: Request):
        return await answer(request, DetokenizeRequest, tokens.detokenize)

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return JSONResponse(VersionResponse(version=app.version).model_dump())

    @app.get("/v1/moe/stats", responses=openapi.errors(401))
    async def moe_stats():
        stats = await async_engine.moe_stats()
        if not stats:
            return JSONResponse({"note": "no MoE statistics are exposed yet (no expert cache, predictor or "
                                         "expert parallelism registered a source)"})
        return JSONResponse(stats)

    @app.get("/health", responses=openapi.errors(503))
    async def health():
        if async_engine.ready:
            return JSONResponse({"status": "ok"})
        reason = async_engine.error or "the model is loading"
        return error_response(ApiError(503, reason, "server_error", code="engine_unavailable"))

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # probes that send HEAD

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
    async def prometheus():
        metrics.moe_stats = await async_engine.moe_stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def server_options(cfg: ServerConfig, on_engine_death: Callable[[], None] | None = None) -> dict:
    """build_app keyword options from the config tree's server section."""
    return dict(model_name=cfg.served_model_name, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                docs=cfg.docs, access_log=cfg.access_log, stats_interval_s=cfg.log_stats_interval,
                on_engine_death=on_engine_death)
