"""Helpers for the server tests: real uvicorn servers on free loopback ports, serving the tiny random Mixtral (`mixtral_dir`).

No sleeps: the socket is bound and listening before uvicorn starts, so the first HTTP request
connects at once and is answered as soon as uvicorn serves; engine readiness and engine-side
effects are awaited with AsyncEngine.wait_for (a condition variable, always with a timeout).
"""
from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from moe_rt_app.assemble import build_engine
from moe_rt_app.config import build_config
from moe_rt.engine.llm_engine import LLMEngine
from server.app import build_app
from server.async_engine import AsyncEngine

MODEL = "tiny-mixtral"
WAIT = 60.0  # seconds any wait may take on a loaded shared machine before the test fails


@dataclass
class LiveServer:
    url: str
    engine: AsyncEngine
    server: uvicorn.Server

    def post(self, path: str, body, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=WAIT, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=WAIT, **kw)


def make_engine(model_dir, **opts) -> LLMEngine:
    return build_engine(build_config(model=str(model_dir), dtype="float32", device="cpu", **opts), progress=False).engine


@contextmanager
def live_server(async_engine: AsyncEngine, *, wait_ready: bool = True, **app_kw):
    app = build_app(async_engine, model_name=MODEL, **app_kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        httpx.get(url + "/health", timeout=WAIT)  # answered once uvicorn runs (503 or 200)
        if wait_ready:
            assert async_engine.wait_for(lambda s: s.ready, WAIT), "the engine did not become ready"
        yield LiveServer(url, async_engine, server)
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def sse_events(lines) -> list:
    """Parse an SSE body (iterable of lines) into JSON payloads; the final '[DONE]' stays a str."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for f in fragments:
        assert f.lower() in body["error"]["message"].lower(), body
    return body["error"]
