"""AsyncEngine: an EngineCore (moe_rt/engine/core.py: an LLMEngine, or under expert parallelism
the driver that keeps the follower ranks in step) driven by one background thread, fed from an
asyncio event loop. It uses only the protocol: requests leave the engine by the engine's own rule
(StepResult.finished) or by abort, never by a release here.

Threading discipline (the engine is not thread-safe):
  * Only the engine thread touches the engine's mutable state (add_request, step, abort, stats,
    moe_stats). It also builds the engine when given a factory, so the server answers
    /health with 503 while a model loads.
  * Event-loop code talks to it through `_cmds`, a deque guarded by `_cond` (a
    threading.Condition): it appends ("add" | "abort" | "moe_stats", ...) and notifies. The engine
    thread drains all commands between two steps, so a request arriving mid-generation joins the
    running batch at the next step (continuous batching).
  * Results go back with ONE `loop.call_soon_threadsafe` per engine iteration (`_route_results`),
    which routes the step's deltas and final outputs into per-request asyncio queues. `_streams`
    and `_queued` are touched only on the event loop, so they need no lock.
  * The engine thread publishes an immutable EngineStats snapshot under `_cond` after every
    iteration; metrics read it and tests wait on it with `wait_for` (bounded, no sleeps).
  * Tokenizing a prompt runs in a worker thread (asyncio.to_thread): the tokenizer is read-only
    after load, so it is safe beside the engine thread, and the loop never blocks on it.

Failures:
  * One request: a request the engine refuses (MoeRtError from add_request) or fails
    (finish_reason "error" from step, its sampling or postprocessing raised) ends alone, with an
    exception in its stream; the rest of the batch goes on.
  * The engine: if the model does not load, or step() itself raises (the forward pass, the
    scheduler), the engine is dead for good. Every open stream ends with EngineUnavailable and
    then the `on_death` callbacks run on the event loop, so the server can exit and a supervisor
    restart it rather than answer 503 forever.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import fields, replace
from typing import Callable

from moe_rt.engine.core import CoreStats, EngineCore
from moe_rt.errors import MoeRtError
from moe_rt.outputs import RequestOutput
from moe_rt.sampling_params import SamplingParams

from .streams import Delta, EngineStats, EngineUnavailable, Overloaded, RequestFailed, RequestStream

__all__ = ["AsyncEngine", "Delta", "EngineStats", "EngineUnavailable", "Overloaded", "RequestFailed", "RequestStream"]

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        engine: EngineCore | Callable[[], EngineCore],
        *,
        max_queue: int = 256,
        retry_after_s: int = 1,
    ) -> None:
        """engine: a built engine, or a factory the engine thread calls (the model loads there).
        max_queue: requests allowed to wait for their first token; one more gets Overloaded."""
        if max_queue < 1:
            raise MoeRtError(f"max_queue must be >= 1, got {max_queue}")
        built = isinstance(engine, EngineCore)
        self._engine: EngineCore | None = engine if built else None
        self._factory: Callable[[], EngineCore] | None = None if built else engine
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._cmds: collections.deque = collections.deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._paused = False  # guarded by _cond
        self._stats = EngineStats()  # guarded by _cond
        self._token_samples: collections.deque = collections.deque(maxlen=8192)  # (t, tokens) under _cond
        self.error: str | None = None  # why the engine is unavailable (load failure, crash)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # event loop only
        self._queued = 0  # event loop only: submitted requests without a first token yet
        self._ids = itertools.count()
        self._death_callbacks: list[Callable[[], None]] = []

    # -- lifecycle (event loop) -----------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread (returns at once; `ready` turns true once the model is loaded)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moe-rt-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the engine thread; every unfinished request is aborted and its stream ends with an
        EngineUnavailable error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._fail_streams(EngineUnavailable("the server is shutting down"))

    def on_death(self, callback: Callable[[], None]) -> None:
        """Run `callback()` on the event loop once the engine is dead for good (the model failed to
        load or the engine loop crashed), after every open stream has been failed."""
        self._death_callbacks.append(callback)

    def _died(self) -> None:
        for callback in self._death_callbacks:
            try:
                callback()
            except Exception:
                log.exception("an engine-death callback failed")

    @property
    def ready(self) -> bool:
        return self.stats.ready and self.error is None and not self._stopping

    @property
    def engine(self) -> EngineCore:
        """The loaded engine, for read-only facts (tokenizer, max_model_len, vocab_size)."""
        if self._engine is None or not self.stats.ready:
            raise EngineUnavailable(self.error or "the model is still loading")
        return self._engine

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

    @property
    def queue_length(self) -> int:
        """Requests submitted and waiting for their first token (the bound max_queue applies to)."""
        return self._queued

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds (0 when idle)."""
        now = time.monotonic()
        with self._cond:
            samples = [s for s in self._token_samples if s[0] >= now - window_s]
            total = self._stats.generation_tokens_total
        if not samples:
            return 0.0
        t0, n0 = samples[0]
        # the first sample's tokens were produced before t0; count from the sample before it
        return (total - n0) / max(now - t0, 1e-9) if len(samples) > 1 else 0.0

    def wait_for(self, predicate: Callable[[EngineStats], bool], timeout: float) -> bool:
        """Block the calling (non-loop) thread until predicate(stats) holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._stats), timeout)

    def pause(self) -> None:
        """Stop stepping; new requests are still accepted and wait (drain, maintenance, tests)."""
        with self._cond:
            self._paused = True
            self._stats = replace(self._stats, paused=True)
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._stats = replace(self._stats, paused=False)
            self._cond.notify_all()

    # -- requests (event loop) ------------------------------------------------------------------
    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Prompt -> validated token ids; text is tokenized off the event loop (ids only need a
        range check, cheaper than a thread hop)."""
        if isinstance(prompt, list):
            return self.engine.encode_prompt(prompt)
        return await asyncio.to_thread(self.engine.encode_prompt, prompt)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.to_thread(self.engine.tokenizer.encode_chat, messages)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request; iterate the returned stream for its Deltas.

        Raises Overloaded when max_queue requests already wait, EngineUnavailable when not ready,
        MoeRtError on a bad prompt (the engine's own checks also surface through the stream)."""
        self._check_available()
        ids = await self.encode(prompt)
        self._check_available()  # may have changed while tokenizing
        if self._queued >= self.max_queue:
            raise Overloaded(self._queued, self.retry_after_s)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise MoeRtError(f"request id {rid} is already in use")
        stream = RequestStream(self, rid, ids)
        self._streams[rid] = stream
        self._queued += 1
        self._send(("add", rid, ids, params))
        return stream

    async def moe_stats(self) -> dict | None:
        """engine.moe_stats() read on the engine thread, or None while the engine is not ready."""
        if not self.ready:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._send(("moe_stats", fut))
        return await fut

    def _check_available(self) -> None:
        if self._loop is None:
            raise EngineUnavailable("the engine is not started")
        if not self.ready:
            raise EngineUnavailable(self.error or ("the server is shutting down" if self._stopping else "the model is still loading"))

    def _send(self, cmd: tuple) -> None:
        with self._cond:
            self._cmds.append(cmd)
            self._cond.notify_all()

    def _abort(self, rid: str) -> None:
        stream = self._streams.pop(rid, None)
        if stream is None:
            return  # already finished
        if not stream.started:
            self._queued -= 1
        self._send(("abort", rid))

    def _route_results(self, deltas: list[Delta], finals: list[RequestOutput], errors: dict[str, Exception]) -> None:
        """Runs on the event loop: route one engine iteration's results into request streams."""
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if not stream.started:
                stream.started = True
                self._queued -= 1
            stream._put(d)
        for item in [*finals, *errors.items()]:
            rid, payload = (item.request_id, item) if isinstance(item, RequestOutput) else item
            stream = self._streams.pop(rid, None)
            if stream is None:
                continue
            if not stream.started:
                self._queued -= 1
            stream._put(payload)

    def _fail_streams(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self._route_results([], [], {rid: exc})

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._engine if self._engine is not None else self._factory()
        except Exception as e:  # a bad model folder or a bug: /health says why until the server exits
            log.exception("model failed to load")
            self.error = f"the model failed to load: {e}"
            self._post(self._fail_streams, EngineUnavailable(self.error))
            self._post(self._died)
            self._answer_pending_commands()
            return
        self._engine = engine
        self._publish(engine.stats(), aborted=0, finished=0, tokens=0, prompt_tokens=0)
        with self._cond:
            self._stats = replace(self._stats, ready=True)
            self._cond.notify_all()
        try:
            self._loop_forever(engine)
        except Exception as e:
            log.exception("the engine loop crashed")
            self.error = f"the engine failed: {e}"
            self._post(self._fail_streams, EngineUnavailable(self.error))
            self._post(self._died)
        finally:
            self._answer_pending_commands()
            try:
                for rid in engine.stats().active_requests:  # free every KV block still held
                    engine.abort(rid)
                self._publish(engine.stats(), aborted=0, finished=0, tokens=0, prompt_tokens=0)
            except Exception:  # after a crash the engine state may be broken; nothing more to free
                log.exception("could not abort the remaining requests")
            # An engine built by our factory is ours to close, on this thread (the only one that
            # touches it): it stops background work, and under EP it tells the follower ranks to stop.
            if self._factory is not None:
                try:
                    engine.close()
                except Exception:
                    log.exception("closing the engine failed")

    def _answer_pending_commands(self) -> None:
        """After the loop ends no command will run: answer the moe_stats reads still queued, so no
        handler waits forever (adds need nothing: their streams are failed)."""
        with self._cond:
            cmds, self._cmds = self._cmds, collections.deque()
        for cmd in cmds:
            if cmd[0] == "moe_stats":
                self._post(_set_result, cmd[1], None)

    def _loop_forever(self, engine: EngineCore) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._cmds and (self._paused or not engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    return
                cmds, self._cmds = self._cmds, collections.deque()
                paused = self._paused
            deltas: list[Delta] = []
            finals: list[RequestOutput] = []
            errors: dict[str, Exception] = {}
            aborted = prompt_tokens = tokens = 0
            for cmd in cmds:
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    try:
                        engine.add_request(ids, params, rid)
                        prompt_tokens += len(ids)
                    except MoeRtError as e:  # bad input the server's checks let through: a 400
                        errors[rid] = e
                    except Exception as e:  # a bug, but this request's alone
                        log.exception("adding request %s failed", rid)
                        errors[rid] = RequestFailed(f"the request could not be added: {e}")
                elif cmd[0] == "abort":
                    aborted += engine.abort(cmd[1])  # frees the KV blocks; False once it finished
                elif cmd[0] == "moe_stats":
                    fut = cmd[1]
                    try:
                        res = engine.moe_stats()
                    except Exception as e:  # a bug in the stats code must not kill serving
                        log.exception("moe_stats failed")
                        res = {"error": str(e)}
                    self._post(_set_result, fut, res)
            if not paused and engine.has_unfinished():
                step = engine.step()
                for out in step.outputs:
                    # A failed request (finish_reason "error" on every one of its sequences) is
                    # reported once, with its final output below; it sends no delta.
                    if out.finish_reason == "error" or out.request_id in errors:
                        continue
                    deltas.append(Delta(out.request_id, out.index, out.new_token_ids, out.new_text,
                                        out.finish_reason, out.logprobs))
                    tokens += len(out.new_token_ids)
                for final in step.finished:  # already out of the engine, its KV blocks free
                    if final.failed:  # this request alone failed; the batch goes on
                        errors[final.request_id] = RequestFailed(final.error or "sampling failed")
                    else:
                        finals.append(final)
            # Stats first: anything a client sees after this step must already be counted there.
            self._publish(engine.stats(), aborted=aborted, finished=len(finals), tokens=tokens,
                          prompt_tokens=prompt_tokens)
            if deltas or finals or errors:
                self._post(self._route_results, deltas, finals, errors)

    def _publish(self, core: CoreStats, *, aborted: int, finished: int, tokens: int, prompt_tokens: int) -> None:
        """The engine's own snapshot plus this server's counters, as one EngineStats."""
        with self._cond:
            s = self._stats
            self._stats = replace(
                s,
                **{f.name: getattr(core, f.name) for f in fields(CoreStats)},
                max_batch_size=max(s.max_batch_size, core.last_batch_size),
                generation_tokens_total=s.generation_tokens_total + tokens,
                prompt_tokens_total=s.prompt_tokens_total + prompt_tokens,
                requests_finished=s.requests_finished + finished,
                requests_aborted=s.requests_aborted + aborted,
            )
            if tokens:
                self._token_samples.append((time.monotonic(), self._stats.generation_tokens_total))
            self._cond.notify_all()


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
