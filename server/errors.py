"""Errors the server answers with an OpenAI-style body {"error": {message, type, param, code}}."""
from __future__ import annotations

from pydantic import ValidationError

from .protocol import ErrorDetail, ErrorResponse


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
            msg = f"unknown field '{'.'.join(loc)}'"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{'.'.join(loc)}: {text}" if loc else text
        param = param or (loc[0] if loc else None)
        if msg not in msgs:
            msgs.append(msg)
    return ApiError(400, "; ".join(msgs[:3]) or "invalid request", param=param)
