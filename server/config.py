"""The `server:` section of the config tree: where and how `moe-rt serve` answers HTTP."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_STATS_INTERVAL_S = 10.0


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: a free one, printed at start)")
    served_model_name: str | None = Field(None, description="the model id clients send (default: the folder name)")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1/*")
    max_queue: int = Field(256, ge=1, description="requests allowed to wait for a first token; more get 429")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1, description="largest request body (413 beyond)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    docs: bool = Field(True, description="serve the OpenAPI schema and the /docs page")
    access_log: bool = Field(True, description="log one line per request")
    log_stats_interval: float = Field(DEFAULT_STATS_INTERVAL_S, ge=0,
                                      description="seconds between throughput lines in the log (0: never)")

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not valid_api_key(v):
            raise ValueError(f"api_key {API_KEY_RULE}")
        return v


API_KEY_RULE = "must be a non-empty key without spaces or control characters"


def valid_api_key(text: str) -> bool:
    """A key a client can send in one Authorization header."""
    return bool(text) and not any(c.isspace() or not c.isprintable() for c in text)
