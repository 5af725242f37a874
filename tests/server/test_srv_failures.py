"""Server-side failures on live servers: one request failing ends only that request; the engine
dying fails every in-flight request cleanly and calls on_engine_death (the CLI then exits so a
supervisor restarts it); an unhandled exception in a route is a counted 500."""
import asyncio
import threading

import httpx

from server.async_engine import AsyncEngine
from srv_helpers import MODEL, WAIT, assert_error, live_server, make_engine, sse_events

PLAIN = {"model": MODEL, "prompt": "In the beginning", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True}


async def wait_for(engine: AsyncEngine, predicate):
    assert await asyncio.to_thread(engine.wait_for, predicate, WAIT), "timed out waiting for the engine"


def metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def test_a_failing_request_ends_alone(mixtral_dir):
    engine = make_engine(mixtral_dir, max_num_seqs=4)
    real = engine._postprocess

    def flaky(seq, token, logprob):  # requests with these seeds break in postprocessing
        if seq.params.seed in (4242, 4243):
            raise RuntimeError("detokenizer exploded")
        return real(seq, token, logprob)

    engine._postprocess = flaky
    async_engine = AsyncEngine(engine, max_queue=8)
    with live_server(async_engine) as s:
        async def main():
            async_engine.pause()  # all three in one batch
            try:
                async with httpx.AsyncClient(base_url=s.url, timeout=WAIT) as client:
                    good = asyncio.create_task(client.post("/v1/completions", json=PLAIN))
                    bad = asyncio.create_task(client.post("/v1/completions", json={**PLAIN, "seed": 4242, "n": 2}))
                    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "seed": 4243}) as stream:
                        assert stream.status_code == 200
                        await wait_for(async_engine, lambda st: st.waiting_seqs == 4)
                        async_engine.resume()
                        lines = [line async for line in stream.aiter_lines()]
                    return await good, await bad, lines
            finally:
                async_engine.resume()

        good, bad, lines = asyncio.run(main())
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 6
        e = assert_error(bad, 500, "detokenizer exploded")
        assert e["type"] == "server_error" and e["code"] == "request_failed"
        events = sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_failed", events
        assert async_engine.wait_for(lambda st: not st.active_requests and st.kv_blocks_free == st.kv_blocks_total, WAIT)
        assert s.get("/health").status_code == 200
        assert s.post("/v1/completions", PLAIN).status_code == 200  # the engine goes on
        text = s.get("/metrics").text
        assert metric(text, "moe_rt_request_failures_total") == 2
        assert 'moe_rt_requests_total{endpoint="/v1/completions",status="500"} 1.0' in text


def test_engine_crash_fails_in_flight_requests_and_calls_on_engine_death(mixtral_dir):
    died = threading.Event()
    engine = make_engine(mixtral_dir, max_num_seqs=4)
    async_engine = AsyncEngine(engine, max_queue=8)

    def broken_forward():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with live_server(async_engine, on_engine_death=died.set) as s:
        async def main():
            async_engine.pause()
            try:
                async with httpx.AsyncClient(base_url=s.url, timeout=WAIT) as client:
                    plain = asyncio.create_task(client.post("/v1/completions", json=PLAIN))
                    async with client.stream("POST", "/v1/chat/completions", json=CHAT) as stream:
                        await wait_for(async_engine, lambda st: st.waiting_seqs == 2)
                        engine.step = broken_forward
                        async_engine.resume()
                        lines = [line async for line in stream.aiter_lines()]
                    return await plain, lines
            finally:
                async_engine.resume()

        plain, lines = asyncio.run(main())
        assert died.wait(WAIT), "on_engine_death was not called"
        assert assert_error(plain, 503, "illegal memory access")["code"] == "engine_unavailable"
        events = sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_unavailable", events
        assert_error(s.get("/health"), 503, "the engine failed")
        assert_error(s.post("/v1/completions", PLAIN), 503)
        assert s.get("/v1/moe/stats").status_code == 200  # reads never hang on a dead engine
        assert 'moe_rt_requests_total{endpoint="/v1/completions",status="503"} 2.0' in s.get("/metrics").text


def test_a_model_that_fails_to_load_calls_on_engine_death(mixtral_dir):
    died = threading.Event()

    def load():
        raise OSError("weights are truncated")

    async_engine = AsyncEngine(load)
    with live_server(async_engine, wait_ready=False, on_engine_death=died.set) as s:
        assert died.wait(WAIT), "on_engine_death was not called"
        assert_error(s.get("/health"), 503, "the model failed to load: weights are truncated")


def test_an_unhandled_exception_is_a_counted_500(srv, monkeypatch):
    async def broken():
        raise KeyError("a bug")

    monkeypatch.setattr(srv.engine, "moe_stats", broken)
    e = assert_error(srv.get("/v1/moe/stats"), 500, "internal server error")
    assert e["type"] == "server_error"
    monkeypatch.undo()
    text = srv.get("/metrics").text
    assert 'moe_rt_requests_total{endpoint="/v1/moe/stats",status="500"} 1.0' in text
    assert metric(text, "moe_rt_request_failures_total") >= 1
