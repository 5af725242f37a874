"""The OpenAPI document, generated from the real request and response models.

Routes parse their bodies themselves (server/json_body.py, then strict model validation) so bad
input gets our 400 with an OpenAI error body, not FastAPI's 422. FastAPI therefore cannot see the
request models; each such route declares `openapi_extra=json_body(Model)`, and `install` adds
those models' schemas to the document's components so the $refs resolve.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "bad input: malformed JSON, wrong types, unknown fields, values out of range, context exceeded",
    401: "the API key is missing or wrong",
    404: "unknown model or route",
    413: "the body exceeds the size limit",
    429: "too many requests wait for their first token (Retry-After: 1)",
    500: "a server-side failure of this request",
    503: "the model is loading, the engine failed, or the server is shutting down",
}


def errors(*statuses: int) -> dict:
    """`responses=` entries for these error statuses, each with the OpenAI error body."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra=` for a route that reads its JSON body as `model`."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def sse(description: str) -> dict:
    """The text/event-stream alternative of a 200 (stream=true)."""
    return {"text/event-stream": {"schema": {"type": "string", "description": description}}}


def install(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in request_models], ref_template=_REF)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            clash = set(schemas) & set(defs.get("$defs", {}))
            if clash:  # one name, two schemas: the document would lie about one of them
                raise RuntimeError(f"request and response models share names: {sorted(clash)}")
            schemas.update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
