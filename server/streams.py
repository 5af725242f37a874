"""What the AsyncEngine hands to the event loop: per-request streams of Deltas, the engine-stats
snapshot, the two refusals (429 Overloaded, 503 EngineUnavailable) and the per-request failure
(RequestFailed).

Everything here lives on the event loop's side of the thread boundary described in
async_engine.py: a RequestStream is filled by the loop (from the engine thread's one
call_soon_threadsafe per iteration) and drained by one handler, so it needs no lock.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_rt.engine.core import CoreStats
from moe_rt.outputs import RequestOutput, TokenLogprob

if TYPE_CHECKING:  # the owner is only called back, never constructed here
    from .async_engine import AsyncEngine


class Overloaded(Exception):
    """More requests wait than max_queue allows; the app answers 429 with Retry-After."""

    def __init__(self, queued: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is overloaded: {queued} requests are already waiting; retry later")
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine is not loaded yet, failed, or is shutting down (503)."""


class RequestFailed(Exception):
    """The engine could not serve this one request (its sampling or postprocessing raised); the
    rest of the batch goes on. A server bug, not bad input: the client gets a 500 or an error event."""


@dataclass
class Delta:
    """What one completion of a request produced in one engine step."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    text: str  # new text (stop strings held back until they cannot match)
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: list[TokenLogprob] | None  # one per new token, when the request asked for logprobs


@dataclass(frozen=True)
class EngineStats(CoreStats):
    """A consistent snapshot written by the engine thread after each iteration: the engine's own
    CoreStats (batch, queue, KV blocks, steps) plus what only the server counts."""

    ready: bool = False
    paused: bool = False
    max_batch_size: int = 0  # largest batch of one step since start
    generation_tokens_total: int = 0
    prompt_tokens_total: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0  # aborted while unfinished (client gone, shutdown); their KV freed


class RequestStream:
    """Async iterator of Deltas of one request; `final` holds the RequestOutput once it ends.

    Leaving it early (break, exception, cancellation) must go through `abort()` or `aclose()`,
    which frees the request's KV blocks in the engine.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.final: RequestOutput | None = None
        self.started = False  # produced its first token (left the queue)
        self.done = False
        self._owner = owner
        self._items: collections.deque = collections.deque()  # Delta | RequestOutput | Exception
        self._wake = asyncio.Event()

    def _put(self, item) -> None:
        self._items.append(item)
        self._wake.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, Delta):
            # A consumer that fell behind (slow client, busy loop) gets the backlog of one
            # completion as one delta: fewer, larger chunks instead of an ever longer queue.
            while self._items and isinstance(nxt := self._items[0], Delta) and nxt.index == item.index and item.finish_reason is None:
                self._items.popleft()
                item = Delta(item.request_id, item.index, item.token_ids + nxt.token_ids, item.text + nxt.text,
                             nxt.finish_reason, None if item.logprobs is None else item.logprobs + (nxt.logprobs or []))
            return item
        self.done = True
        if isinstance(item, RequestOutput):
            self.final = item
            raise StopAsyncIteration
        raise item  # an exception from the engine thread

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._owner._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()
