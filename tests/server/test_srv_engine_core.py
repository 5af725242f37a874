"""The server drives its engine through EngineCore alone: a live server over a real engine behind a
proxy that refuses every other attribute serves streaming with logprobs, n > 1, tokenize, client
aborts and the stats snapshot exactly as over the bare engine."""
import json

import httpx
import pytest

from moe_rt import SamplingParams
from moe_rt.engine.core import EngineCore
from server.async_engine import AsyncEngine
from srv_helpers import MODEL, WAIT, live_server, make_engine, sse_events

PROTOCOL = {"tokenizer", "max_model_len", "vocab_size", "encode_prompt", "add_request", "abort",
            "has_unfinished", "step", "stats", "moe_stats", "close"}
PROMPT = "In the beginning God created"


class ProtocolOnly:
    """An engine with nothing but the EngineCore members: any reach-in raises AttributeError."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        if name not in PROTOCOL:
            raise AttributeError(f"{name} is not part of EngineCore")
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def core_srv(mixtral_dir):
    core = ProtocolOnly(make_engine(mixtral_dir, max_num_seqs=4))
    assert isinstance(core, EngineCore)
    with live_server(AsyncEngine(core, max_queue=8)) as s:
        yield s


def test_streamed_deltas_and_logprobs_equal_offline_generate(core_srv, mixtral_llm):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    with httpx.stream("POST", core_srv.url + "/v1/completions", json={**body, "stream": True}, timeout=WAIT) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [c for e in events[:-1] for c in e["choices"]]
    ref = mixtral_llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2))[0]
    assert "".join(c["text"] for c in chunks) == ref.text
    streamed = [x for c in chunks if c.get("logprobs") for x in c["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx([lp.logprob for lp in ref.outputs[0].logprobs], abs=1e-5)
    whole = core_srv.post("/v1/completions", body).json()["choices"][0]
    assert whole["text"] == ref.text and whole["logprobs"]["token_logprobs"] == pytest.approx(streamed, abs=1e-5)


def test_n_completions_tokenize_and_stats(core_srv, mixtral_llm):
    out = core_srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "n": 2,
                                            "temperature": 1.0, "seed": 3}).json()
    assert sorted(c["index"] for c in out["choices"]) == [0, 1]
    ids = core_srv.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert ids == mixtral_llm.tokenizer.encode(PROMPT)
    st = core_srv.engine.stats
    assert st.requests_finished >= 1 and st.num_steps > 0 and st.max_batch_size >= 2
    assert not st.active_requests and st.kv_blocks_free == st.kv_blocks_total > 0


def test_client_disconnect_aborts_through_the_protocol(core_srv):
    aborted0 = core_srv.engine.stats.requests_aborted
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", core_srv.url + "/v1/completions", json=body, timeout=WAIT) as r:
        first = json.loads(next(r.iter_lines())[len("data: "):])
    rid = first["id"] + "-0"
    assert core_srv.engine.wait_for(
        lambda s: rid not in s.active_requests and s.requests_aborted == aborted0 + 1
        and s.kv_blocks_free == s.kv_blocks_total, WAIT), core_srv.engine.stats
