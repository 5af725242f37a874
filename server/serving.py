"""OpenAI completions and chat on top of the AsyncEngine: request -> SamplingParams, engine
requests (one per prompt, each with n completions), and the response or its SSE stream.

Choice indices follow OpenAI: prompt p's completion i is choice p * n + i. Usage counts each
prompt's tokens once (not once per n) and every choice's output tokens.

A failure while a request runs ends that HTTP request only: before the response starts it is an
error body (errors.to_api_error decides the status), after a stream has started one
`data: {"error": ...}` event and then `data: [DONE]`. Server-side failures (500) are logged and
counted in moe_rt_request_failures_total.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from moe_rt.outputs import TokenLogprob
from moe_rt.sampling_params import SamplingParams

from .async_engine import AsyncEngine, Delta, Overloaded, RequestStream
from .errors import ApiError, model_not_found, to_api_error
from .metrics import ServerMetrics
from .protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, TopLogprob, Usage,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

WaitDisconnect = Callable[[], Awaitable[None]]

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection before the response was ready; nothing is sent."""


@dataclass
class _Run:
    """One HTTP request's engine requests and its timing."""

    streams: list[RequestStream]
    n: int
    t0: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    tokens: int = 0

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def see(self, d: Delta) -> None:
        if d.token_ids and self.t_first is None:
            self.t_first = time.monotonic()
        self.tokens += len(d.token_ids)

    def usage(self) -> Usage:
        prompt = sum(len(s.prompt_token_ids) for s in self.streams)
        return Usage(prompt_tokens=prompt, completion_tokens=self.tokens, total_tokens=prompt + self.tokens)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(prompt index, delta) from several streams as they come; re-raises a stream's error."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for d in s:
                q.put_nowait((i, d))
            q.put_nowait((i, None))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj) -> str:
    body = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics

    # -- shared steps ---------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise model_not_found(name, self.model_name)

    def fail(self, e: Exception) -> ApiError:
        """The client's view of an exception raised while serving; server-side failures are logged
        and counted here, once for both the JSON and the streaming path."""
        err = to_api_error(e)
        if err.status == 500:
            self.metrics.request_failures.inc()
            if err.code == "request_failed":
                log.error("request failed in the engine: %s", e)
            else:
                log.error("unhandled error while serving a request", exc_info=e)
        return err

    def _logit_bias(self, req) -> dict[int, float]:
        bias = req.logit_bias_ids
        vocab = self.engine.engine.vocab_size
        for tok in bias:
            if not 0 <= tok < vocab:
                raise ApiError(400, f"logit_bias: key '{tok}' is not a token id in [0, {vocab})", param="logit_bias")
        return bias

    def _params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        ctx = self.engine.engine.max_model_len
        if max_tokens is None:
            max_tokens = ctx - prompt_len
        if prompt_len + max(max_tokens, 1) > ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; you requested {prompt_len + max_tokens} "
                                f"({prompt_len} in the prompt, {max_tokens} for the completion)",
                           param="max_tokens" if prompt_len < ctx else "prompt", code="context_length_exceeded")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=req.stop_list,
            n=req.n,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(req),
            response_format=req.response_format.type if req.response_format is not None else "text",
        )

    async def _submit(self, rid: str, prompts: list[list[int]], params: list[SamplingParams]) -> _Run:
        run = _Run([], params[0].n)
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                run.streams.append(await self.engine.generate(ids, p, f"{rid}-{i}"))
        except BaseException:
            run.abort()
            raise
        return run

    async def _until_done(self, run: _Run, work: Awaitable, wait_disconnect: WaitDisconnect):
        """Await `work` unless the client goes away first; then abort the run (frees the KV)."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(wait_disconnect())
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            raise ClientGone()
        finally:
            for t in (task, watch):
                t.cancel()
            run.abort()

    def _finish_metrics(self, run: _Run) -> None:
        self.metrics.observe_request(None if run.t_first is None else run.t_first - run.t0, time.monotonic() - run.t0, run.tokens)

    def _token_str(self, token_id: int) -> str:
        return self.engine.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- /v1/completions ------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, wait_disconnect: WaitDisconnect):
        """A CompletionResponse, or an async iterator of SSE lines when req.stream."""
        self._check_model(req.model)
        prompts = [await self.engine.encode(p) for p in req.prompts]
        max_tokens = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        params = [self._params(req, len(ids), max_tokens, req.logprobs) for ids in prompts]
        echo = [self._prompt_text(p, ids) if req.echo else "" for p, ids in zip(req.prompts, prompts)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        run = await self._submit(rid, prompts, params)
        head = dict(id=rid, created=int(time.time()), model=self.model_name)
        if req.stream:
            return self._stream_completions(run, head, echo, req.include_usage)

        async def collect() -> CompletionResponse:
            offsets = {}
            texts: dict[int, list[str]] = {}
            lps: dict[int, list] = {}
            reasons: dict[int, str | None] = {}
            async for p, d in _merge(run.streams):
                run.see(d)
                idx = p * run.n + d.index
                texts.setdefault(idx, [echo[p]]).append(d.text)
                offsets.setdefault(idx, len(echo[p]))
                if d.logprobs is not None:
                    lps.setdefault(idx, []).extend(d.logprobs)
                reasons[idx] = d.finish_reason
            choices = []
            for idx in range(len(run.streams) * run.n):
                lp = self._completion_logprobs(lps.get(idx, []), offsets.get(idx, 0)) if req.logprobs is not None else None
                choices.append(CompletionChoice(index=idx, text="".join(texts.get(idx, [])), logprobs=lp,
                                                finish_reason=reasons.get(idx)))
            self._finish_metrics(run)
            return CompletionResponse(**head, choices=choices, usage=run.usage())

        return await self._until_done(run, collect(), wait_disconnect)

    def _prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.engine.engine.tokenizer.decode(ids)

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens, offs = [], []
        for lp in lps:
            offs.append(offset)
            tokens.append(self._token_str(lp.token_id))
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[{self._token_str(t): v for t, v in lp.top.items()} for lp in lps],
            text_offset=offs,
        )

    async def _stream_completions(self, run: _Run, head: dict, echo: list[str], include_usage: bool) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}
        try:
            if any(echo):
                for p, text in enumerate(echo):
                    for i in range(run.n):
                        offsets[p * run.n + i] = len(text)
                        yield _sse(CompletionResponse(**head, choices=[CompletionChoice(index=p * run.n + i, text=text)]))
            async for p, d in _merge(run.streams):
                run.see(d)
                idx = p * run.n + d.index
                lp = None
                if d.logprobs is not None:
                    lp = self._completion_logprobs(d.logprobs, offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + len(d.text)
                if not d.text and d.finish_reason is None and lp is None:
                    continue
                yield _sse(CompletionResponse(**head, choices=[CompletionChoice(index=idx, text=d.text, logprobs=lp,
                                                                                finish_reason=d.finish_reason)]))
            self._finish_metrics(run)
            if include_usage:
                yield _sse(CompletionResponse(**head, choices=[], usage=run.usage()))
        except Exception as e:
            yield _sse(self.fail(e).body())
        finally:
            run.abort()  # no-op when finished; frees the KV when the client left mid-stream
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, wait_disconnect: WaitDisconnect):
        self._check_model(req.model)
        ids = await self.engine.encode_chat([m.as_template_dict() for m in req.messages])
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, len(ids), req.max_new_tokens, top)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = await self._submit(rid, [ids], [params])
        head = dict(id=rid, created=int(time.time()), model=self.model_name)
        if req.stream:
            return self._stream_chat(run, head, req.include_usage)

        async def collect() -> ChatCompletionResponse:
            texts: dict[int, list[str]] = {i: [] for i in range(run.n)}
            lps: dict[int, list] = {i: [] for i in range(run.n)}
            reasons: dict[int, str | None] = {}
            async for _, d in _merge(run.streams):
                run.see(d)
                texts[d.index].append(d.text)
                lps[d.index].extend(d.logprobs or [])
                reasons[d.index] = d.finish_reason
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content="".join(texts[i])),
                           logprobs=self._chat_logprobs(lps[i]) if req.logprobs else None, finish_reason=reasons.get(i))
                for i in range(run.n)
            ]
            self._finish_metrics(run)
            return ChatCompletionResponse(**head, choices=choices, usage=run.usage())

        return await self._until_done(run, collect(), wait_disconnect)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        s = self._token_str(token_id)
        return TopLogprob(token=s, logprob=logprob, bytes=list(s.encode("utf-8")))

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._top(lp.token_id, lp.logprob).model_dump(),
                             top_logprobs=[self._top(t, v) for t, v in lp.top.items()])
            for lp in lps
        ])

    async def _stream_chat(self, run: _Run, head: dict, include_usage: bool) -> AsyncIterator[str]:
        def chunk(i: int, delta: ChatDelta, finish: str | None = None, lps=None) -> str:
            return _sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish)]))

        try:
            for i in range(run.n):
                yield chunk(i, ChatDelta(role="assistant", content=""))
            async for _, d in _merge(run.streams):
                run.see(d)
                lps = self._chat_logprobs(d.logprobs) if d.logprobs is not None else None
                if d.text or lps is not None:
                    yield chunk(d.index, ChatDelta(content=d.text), lps=lps)
                if d.finish_reason is not None:
                    yield chunk(d.index, ChatDelta(), d.finish_reason)
            self._finish_metrics(run)
            if include_usage:
                yield _sse(ChatCompletionChunk(**head, choices=[], usage=run.usage()))
        except Exception as e:
            yield _sse(self.fail(e).body())
        finally:
            run.abort()
        yield "data: [DONE]\n\n"


__all__ = ["OpenAIServing", "ClientGone", "Overloaded", "COMPLETION_DEFAULT_MAX_TOKENS"]
