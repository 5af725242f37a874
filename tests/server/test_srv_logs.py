"""The access log (one line per request, switchable) and the periodic throughput line.

Log records are awaited with a handler that signals a condition variable (bounded waits, no
sleeps); the throughput line's arithmetic is checked on the pure formatting function."""
import asyncio
import logging
import re
import threading
from contextlib import contextmanager

import pytest

from server.async_engine import AsyncEngine, EngineStats
from server.gate import Gate
from server.metrics import ServerMetrics
from server.stats_log import stats_line
from srv_helpers import MODEL, WAIT, live_server, make_engine


class Records(logging.Handler):
    """Collects the messages of one logger; wait_for blocks until one matches."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.messages.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, pattern: str) -> re.Match:
        found = []

        def match():
            found[:] = [m for m in map(re.compile(pattern).search, self.messages) if m]
            return bool(found)

        with self.cond:
            assert self.cond.wait_for(match, WAIT), f"no log line matched {pattern!r}: {self.messages}"
        return found[0]


@contextmanager
def records(name: str):
    logger, handler = logging.getLogger(name), Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_access_log_has_method_path_status_duration_and_client(srv):
    with records("server.access") as log:
        assert srv.get("/v1/models/nope").status_code == 404
        m = log.wait_for(r'^127\.0\.0\.1:(\d+) "GET /v1/models/nope" 404 ([\d.]+) ms$')
        assert int(m.group(1)) > 0 and float(m.group(2)) >= 0


@pytest.mark.parametrize("enabled", [True, False])
def test_access_log_switch(enabled):
    """The Gate alone, driven as an ASGI app: nothing runs after the call, so 'no line' is certain."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        pass

    gate = Gate(app, metrics=ServerMetrics(AsyncEngine(lambda: None)), api_key=None, max_bytes=100, access_log=enabled)
    scope = {"type": "http", "method": "DELETE", "path": "/x", "headers": [], "client": ("10.0.0.7", 4321)}
    with records("server.access") as log:
        asyncio.run(gate(scope, receive, send))
    assert [re.sub(r"[\d.]+ ms$", "T ms", m) for m in log.messages] == (['10.0.0.7:4321 "DELETE /x" 204 T ms'] if enabled else [])


def test_stats_line_arithmetic():
    prev = EngineStats(prompt_tokens_total=100, generation_tokens_total=1000)
    cur = EngineStats(prompt_tokens_total=150, generation_tokens_total=1400, running_seqs=3, waiting_seqs=1,
                      kv_blocks_total=200, kv_blocks_free=150)
    assert stats_line(prev, cur, 2.0, queued=2) == (
        "Avg prompt throughput: 25.0 tokens/s, Avg generation throughput: 200.0 tokens/s, "
        "Running: 3 seqs, Waiting: 1 seqs, Queue: 2 reqs, KV cache usage: 25.0%")
    idle = EngineStats(prompt_tokens_total=150, generation_tokens_total=1400, kv_blocks_total=200, kv_blocks_free=200)
    assert stats_line(idle, idle, 10.0, queued=0) is None  # an idle server stays quiet
    assert "Queue: 1 reqs" in stats_line(idle, idle, 10.0, queued=1)


def test_stats_line_is_logged_while_serving(mixtral_dir):
    with records("server.stats") as log:
        with live_server(AsyncEngine(make_engine(mixtral_dir)), stats_interval_s=0.02, access_log=False) as s:
            r = s.post("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200
            m = log.wait_for(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([1-9][\d.]*) tokens/s, "
                             r"Running: \d+ seqs, Waiting: \d+ seqs, Queue: \d+ reqs, KV cache usage: [\d.]+%")
            assert float(m.group(2)) > 0
