"""Batching, abort on disconnect, overload, auth, health, metrics and model listing on live servers.

Determinism without sleeps: AsyncEngine.pause() holds the engine between steps while requests
queue, and AsyncEngine.wait_for(...) waits (bounded) for the engine-side state a test needs.
"""
import asyncio
import json
import socket
import threading

import httpx
import pytest

from server.async_engine import AsyncEngine
from srv_helpers import MODEL, WAIT, assert_error, live_server, make_engine, sse_events


def body(**kw):
    return {"model": MODEL, "prompt": "In the beginning", "temperature": 0, "ignore_eos": True, **kw}


async def wait_for(engine: AsyncEngine, predicate):
    assert await asyncio.to_thread(engine.wait_for, predicate, WAIT), "timed out waiting for the engine"


def test_concurrent_requests_share_engine_steps(srv):
    async def main():
        steps0 = srv.engine.stats.num_steps
        srv.engine.pause()
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as client:
                tasks = [asyncio.create_task(client.post("/v1/completions", json=body(max_tokens=8, prompt=p)))
                         for p in ("In the beginning", "Hello world", "And God said", "the quick brown fox")]
                await wait_for(srv.engine, lambda s: s.waiting_seqs == 4)
                srv.engine.resume()
                rs = await asyncio.gather(*tasks)
        finally:
            srv.engine.resume()
        assert [r.status_code for r in rs] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in rs)
        # one prefill of all four, then 7 decode steps of all four (alone it would take 4 x 8 steps)
        assert srv.engine.stats.num_steps - steps0 == 8
        assert srv.engine.stats.max_batch_size >= 4

    asyncio.run(main())


def test_request_joins_the_running_batch(srv):
    async def main():
        steps0 = srv.engine.stats.num_steps
        async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as client:
            async with client.stream("POST", "/v1/completions", json=body(max_tokens=120, stream=True)) as long:
                lines = long.aiter_lines()
                first = await anext(lines)
                assert first.startswith("data: ")
                srv.engine.pause()  # the long request is mid-generation
                try:
                    short = asyncio.create_task(client.post("/v1/completions", json=body(max_tokens=4)))
                    await wait_for(srv.engine, lambda s: s.waiting_seqs == 1 and s.running_seqs == 1)
                    srv.engine.resume()
                    r = await short
                finally:
                    srv.engine.resume()
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
                rest = sse_events([first] + [line async for line in lines])
        assert rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
        # long alone: 1 prefill + 119 decodes; the short one's prefill and its 3 decodes all ride
        # along in the long one's steps (prefill and decode share a forward), so it adds no step
        # (run one after the other it would add 4)
        assert srv.engine.stats.num_steps - steps0 == 120

    asyncio.run(main())


def test_stream_client_disconnect_aborts_and_frees_kv(srv):
    aborted0 = srv.engine.stats.requests_aborted
    with httpx.stream("POST", srv.url + "/v1/completions", json=body(max_tokens=200, stream=True), timeout=WAIT) as r:
        first = json.loads(next(r.iter_lines())[len("data: "):])
    rid = first["id"] + "-0"
    assert srv.engine.wait_for(
        lambda s: rid not in s.active_requests and s.requests_aborted == aborted0 + 1 and s.kv_blocks_free == s.kv_blocks_total,
        WAIT,
    ), srv.engine.stats


def test_non_stream_client_disconnect_aborts(srv):
    aborted0 = srv.engine.stats.requests_aborted
    payload = json.dumps(body(max_tokens=200)).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    srv.engine.pause()
    try:
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            assert srv.engine.wait_for(lambda s: s.waiting_seqs == 1, WAIT)
    finally:
        srv.engine.resume()
    assert srv.engine.wait_for(
        lambda s: not s.active_requests and s.requests_aborted == aborted0 + 1 and s.kv_blocks_free == s.kv_blocks_total,
        WAIT,
    ), srv.engine.stats


@pytest.fixture(scope="module")
def guarded(mixtral_dir):
    """A server with an API key and room for one waiting request."""
    with live_server(AsyncEngine(make_engine(mixtral_dir, max_num_seqs=4), max_queue=1), api_key="sekret") as s:
        yield s


AUTH = {"Authorization": "Bearer sekret"}


def test_api_key(guarded):
    assert_error(guarded.post("/v1/completions", body(max_tokens=2)), 401, "api key")
    assert_error(guarded.post("/v1/completions", body(max_tokens=2), headers={"Authorization": "Bearer nope"}), 401)
    assert_error(guarded.get("/v1/models", headers={"Authorization": "sekret"}), 401)
    assert guarded.post("/v1/completions", body(max_tokens=2), headers=AUTH).status_code == 200
    assert guarded.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
    assert guarded.get("/health").status_code == 200  # probes need no key
    assert guarded.get("/metrics").status_code == 200
    for path in ("/tokenize", "/detokenize", "/v1/models/" + MODEL, "/v1/moe/stats"):  # the model's endpoints need it
        r = guarded.post(path, {"prompt": "a"}) if "tokenize" in path else guarded.get(path)
        assert_error(r, 401, "api key")
    assert guarded.post("/tokenize", {"prompt": "a"}, headers=AUTH).status_code == 200
    for path in ("/version", "/openapi.json", "/docs"):  # discovery stays open
        assert guarded.get(path).status_code == 200, path


def test_queue_full_is_429_with_retry_after(guarded):
    async def main():
        guarded.engine.pause()
        try:
            async with httpx.AsyncClient(base_url=guarded.url, timeout=WAIT, headers=AUTH) as client:
                first = asyncio.create_task(client.post("/v1/completions", json=body(max_tokens=3)))
                await wait_for(guarded.engine, lambda s: s.waiting_seqs == 1)
                second = await client.post("/v1/completions", json=body(max_tokens=3))
                stream = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True})
                guarded.engine.resume()
                assert (await first).status_code == 200
        finally:
            guarded.engine.resume()
        for r in (second, stream):
            e = assert_error(r, 429, "overloaded")
            assert e["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert guarded.post("/v1/completions", body(max_tokens=2), headers=AUTH).status_code == 200

    asyncio.run(main())


def test_health_is_503_until_loaded_and_moe_stats_are_exported(mixtral_dir):
    gate = threading.Event()

    def load():
        assert gate.wait(WAIT)
        engine = make_engine(mixtral_dir)
        engine.stat_sources["cache"] = lambda: {"hits": 3, "hit_rate": [0.5, 0.25], "by_kind": {"prefetch": 2}}
        return engine

    async_engine = AsyncEngine(load)
    with live_server(async_engine, wait_ready=False) as s:
        assert_error(s.get("/health"), 503, "loading")
        assert_error(s.post("/v1/completions", body(max_tokens=2)), 503, "loading")
        assert s.get("/v1/models").json()["data"][0]["max_model_len"] is None
        gate.set()
        assert async_engine.wait_for(lambda st: st.ready, WAIT)
        assert s.get("/health").json() == {"status": "ok"}
        assert s.get("/v1/moe/stats").json() == {"cache": {"hits": 3, "hit_rate": [0.5, 0.25], "by_kind": {"prefetch": 2}}}
        text = s.get("/metrics").text
        assert 'moe_rt_moe_cache_hit_rate{layer="1"} 0.25' in text
        assert "moe_rt_moe_cache_hits 3.0" in text
        assert "moe_rt_moe_cache_by_kind_prefetch 2.0" in text
    assert not async_engine.ready  # shut down with the server


def test_models_health_moe_stats_and_metrics(srv):
    models = srv.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 256
    assert srv.get("/health").status_code == 200
    assert "no MoE statistics" in srv.get("/v1/moe/stats").json()["note"]
    r = srv.post("/v1/completions", body(max_tokens=5))
    assert r.status_code == 200
    text = srv.get("/metrics").text
    for name in [
        'moe_rt_requests_total{endpoint="/v1/completions",status="200"}',
        "moe_rt_time_to_first_token_seconds_bucket", "moe_rt_time_per_output_token_seconds_bucket",
        "moe_rt_e2e_request_latency_seconds_bucket", "moe_rt_queue_length", "moe_rt_running_batch_size",
        "moe_rt_generation_tokens_total", "moe_rt_generation_tokens_per_second", "moe_rt_kv_cache_usage",
        "moe_rt_engine_ready 1.0",
    ]:
        assert name in text, name
    generated = next(line for line in text.splitlines() if line.startswith("moe_rt_generation_tokens_total"))
    assert float(generated.split()[-1]) == srv.engine.stats.generation_tokens_total >= 5
