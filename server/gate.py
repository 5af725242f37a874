"""The ASGI layer in front of every route: counting, access log, bearer key, body limit, and the
last catch of a server bug.

A pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass untouched). It
sits inside Starlette's ServerErrorMiddleware, so an exception no route handled is turned into the
500 here, where it is counted and logged like any other response, rather than outside it.
"""
from __future__ import annotations

import hmac
import logging
import time

from fastapi.responses import JSONResponse

from .errors import ApiError
from .metrics import ServerMetrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

# Label values of moe_rt_requests_total{endpoint}: the routes, with path parameters as written in
# the route; anything else is "other" (so a scan of random paths cannot grow the label set).
ENDPOINTS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/moe/stats", "/tokenize", "/detokenize",
    "/version", "/health", "/metrics", "/openapi.json", "/docs",
})
_MODEL_PREFIX = "/v1/models/"
# Behind the API key: the model's own endpoints. /health, /metrics, /version and the schema stay
# open for probes and discovery.
_PROTECTED_PREFIX = "/v1/"
_PROTECTED = frozenset({"/tokenize", "/detokenize"})


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        return "/v1/models/{model_id}"
    return "other"


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Gate:
    """Counts every response by endpoint and status, logs one access line per request, checks the
    bearer key, and reads at most max_bytes of a request body (413 beyond, chunked uploads
    included) before replaying it to the app, so the app never sees more."""

    def __init__(self, app, *, metrics: ServerMetrics, api_key: str | None, max_bytes: int, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status: int | None = None

        async def counted_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                self.metrics.requests.labels(endpoint_label(path), str(status)).inc()
            await send(msg)

        try:
            await self._admit(scope, receive, counted_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            self.metrics.request_failures.inc()
            if status is None:
                await error_response(ApiError(500, "internal server error", "server_error"))(scope, receive, counted_send)
            # else the response has started: returning unfinished makes the server drop the connection
        finally:
            if self.access_log:
                client = scope.get("client")
                access_log.info('%s "%s %s" %s %.1f ms', f"{client[0]}:{client[1]}" if client else "-",
                                scope.get("method"), path, status or "-", (time.perf_counter() - t0) * 1000)

    async def _admit(self, scope, receive, send):
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and (path.startswith(_PROTECTED_PREFIX) or path in _PROTECTED):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                e = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
                return await error_response(e)(scope, receive, send)
        too_big = ApiError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and (len(length) > 18 or int(length) > self.max_bytes):
            return await error_response(too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await error_response(too_big)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        return await self.app(scope, replay, send)
