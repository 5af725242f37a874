"""Errors the server answers with an OpenAI-style body {"error": {message, type, param, code}}, and
the one mapping from an exception to that answer (a response body, or an event mid-stream)."""
from __future__ import annotations

from pydantic import ValidationError

from moe_rt.errors import MoeRtError

from .protocol import ErrorDetail, ErrorResponse
from .streams import EngineUnavailable, Overloaded, RequestFailed


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"the model '{name[:200]}' does not exist; this server serves '{served}'",
                    param="model", code="model_not_found")


def to_api_error(e: Exception) -> ApiError:
    """What the client sees for an exception raised while serving its request. Anything not named
    here is a server bug: a 500 with no details (the caller logs it)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, MoeRtError):
        return ApiError(400, str(e))
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), "server_overloaded", code="queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), "server_error", code="engine_unavailable")
    if isinstance(e, RequestFailed):
        return ApiError(500, f"the request failed in the engine: {e}", "server_error", code="request_failed")
    return ApiError(500, "internal server error", "server_error")


_UNION_FIELDS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "stop must be a string or a list of strings",
    "content": "message content must be a string or a list of {'type': 'text', 'text': ...} parts",
}


def validation_error(e: ValidationError) -> ApiError:
    """A 400 naming the first offending fields in one line (not pydantic's multi-line dump)."""
    msgs: list[str] = []
    param = None
    for err in e.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        field = next((f for f in loc if f in _UNION_FIELDS), None)
        if field is not None:
            msg = _UNION_FIELDS[field]
        elif err["type"] == "extra_forbidden":
            msg = f"unknown field '{'.'.join(loc)[:80]}'"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{'.'.join(loc)}: {text}" if loc else text
        param = param or (loc[0] if loc else None)
        if msg not in msgs:
            msgs.append(msg)
    return ApiError(400, "; ".join(msgs[:3]) or "invalid request", param=param)
