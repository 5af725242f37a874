"""The periodic throughput line, as vLLM logs it:

  Avg prompt throughput: 120.0 tokens/s, Avg generation throughput: 850.3 tokens/s,
  Running: 12 seqs, Waiting: 3 seqs, Queue: 1 reqs, KV cache usage: 41.2%

Running and Waiting count sequences in the engine (a request with n=4 is four); Queue counts HTTP
requests still waiting for their first token (the bound --max-queue applies to). Throughputs are
averages over the interval since the previous line. An idle server stays quiet: a line is logged
only when the interval saw tokens or something is still running, waiting or queued.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .async_engine import AsyncEngine
from .streams import EngineStats

log = logging.getLogger("server.stats")


def stats_line(prev: EngineStats, cur: EngineStats, elapsed_s: float, queued: int) -> str | None:
    """The line for the interval from `prev` to `cur`, or None when there is nothing to say."""
    prompt = cur.prompt_tokens_total - prev.prompt_tokens_total
    generated = cur.generation_tokens_total - prev.generation_tokens_total
    if not (prompt or generated or cur.running_seqs or cur.waiting_seqs or queued):
        return None
    dt = max(elapsed_s, 1e-9)
    return (f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {generated / dt:.1f} tokens/s, "
            f"Running: {cur.running_seqs} seqs, Waiting: {cur.waiting_seqs} seqs, Queue: {queued} reqs, "
            f"KV cache usage: {cur.kv_cache_usage * 100:.1f}%")


async def log_stats_forever(engine: AsyncEngine, interval_s: float) -> None:
    """Log stats_line every interval_s seconds until cancelled (the app's lifespan owns the task)."""
    prev, t_prev = engine.stats, time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        cur, now = engine.stats, time.monotonic()
        line = stats_line(prev, cur, now - t_prev, engine.queue_length)
        if line is not None:
            log.info(line)
        prev, t_prev = cur, now
