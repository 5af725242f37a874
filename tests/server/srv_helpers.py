"""Helpers for the server tests: real uvicorn servers on free loopback ports, serving the tiny random Mixtral (`mixtral_dir`).

No sleeps: the socket is bound and listening before uvicorn starts, so the first HTTP request
connects at once and is answered as soon as uvicorn serves; engine readiness and engine-side
effects are awaited with AsyncEngine.wait_for (a condition variable, always with a timeout).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from moe_rt_app.assemble import build_engine
from moe_rt_app.config import build_config
from moe_rt.engine.llm_engine import LLMEngine
from server.app import build_app
from server.async_engine import AsyncEngine

MODEL = "tiny-mixtral"
WAIT = 60.0  # seconds any wait may take on a loaded shared machine before the test fails
ROOT = Path(__file__).resolve().parents[2]


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


class ServeProcess:
    """`python -m moe_rt_app.cli.serve ...` as a subprocess, its output lines collected by reader
    threads (waits are bounded queue reads: no sleeps, no polling)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moe_rt_app.cli.serve", *argv], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for t in self._readers:
            t.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the process closed its stdout (exited)

    def wait_line(self, pattern: str) -> re.Match:
        """The first later stdout line matching pattern (bounded; fails if the process ends first)."""
        return self.wait_lines(pattern)[0]

    def wait_lines(self, *patterns: str) -> list[re.Match]:
        """One later stdout line matching each pattern, in any order (bounded; fails if the process
        ends first)."""
        found: dict[str, re.Match] = {}
        while len(found) < len(patterns):
            missing = [p for p in patterns if p not in found]
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"no line matching {missing!r} within {WAIT} s; stderr: {''.join(self.err)[-2000:]}")
            if line is None:
                self.proc.wait(WAIT)
                for t in self._readers:
                    t.join(WAIT)
                pytest.fail(f"the server exited ({self.proc.returncode}) before {missing!r}; stderr: {''.join(self.err)[-2000:]}")
            for p in missing:
                if m := re.search(p, line):
                    found[p] = m
        return [found[p] for p in patterns]

    def stop(self) -> int:
        """SIGTERM, as a supervisor would; returns the exit code (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            for t in self._readers:
                t.join(WAIT)
