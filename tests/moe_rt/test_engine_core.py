"""EngineCore on a real tiny checkpoint: LLMEngine implements the protocol, and every member of it
does what a driver relies on (stats snapshot contents, abort forgets, step reports each finished
request once, close is idempotent)."""
import pytest

from moe_rt.engine.core import CoreStats, EngineCore
from moe_rt.outputs import StepResult
from moe_rt.sampling_params import SamplingParams
from moe_rt_app.assemble import build_engine
from moe_rt_app.config import build_config

# The whole surface a driver may use; growing it is a design decision, so this test names it.
PROTOCOL = {"tokenizer", "max_model_len", "vocab_size", "encode_prompt", "add_request", "abort",
            "has_unfinished", "step", "stats", "moe_stats", "close"}
GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def protocol_members(proto) -> set[str]:
    methods = {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    return methods | set(proto.__annotations__)


@pytest.fixture
def engine(mixtral_dir):
    eng = build_engine(build_config(model=str(mixtral_dir), dtype="float32", device="cpu"), progress=False).engine
    yield eng
    eng.close()


def test_the_protocol_is_the_listed_surface():
    assert protocol_members(EngineCore) == PROTOCOL


def test_a_factory_is_not_an_engine_core():
    # AsyncEngine tells a built engine from a factory by this check.
    assert not isinstance(lambda: None, EngineCore)


def test_llm_engine_implements_every_member(engine):
    core: EngineCore = engine
    assert isinstance(core, EngineCore)
    assert core.vocab_size == engine.spec.vocab_size and core.max_model_len == engine.max_model_len
    assert core.encode_prompt("In the beginning") == core.tokenizer.encode("In the beginning")
    total = engine.blocks.num_blocks
    assert core.stats() == CoreStats(kv_blocks_total=total, kv_blocks_free=total)

    a = core.add_request(core.encode_prompt("In the beginning"), GREEDY, "a")
    b = core.add_request("And the earth", SamplingParams(max_tokens=3, temperature=0, n=2), "b")
    st = core.stats()
    assert (a, b) == ("a", "b") and st.active_requests == {"a", "b"}
    assert (st.waiting_seqs, st.running_seqs, st.num_steps) == (3, 0, 0) and core.has_unfinished()

    res = core.step()
    assert isinstance(res, StepResult) and res.finished == []
    assert sorted((o.request_id, o.index) for o in res.outputs) == [("a", 0), ("b", 0), ("b", 1)]
    st = core.stats()
    assert (st.running_seqs, st.waiting_seqs, st.last_batch_size, st.num_steps) == (3, 0, 3, 1)
    assert 0 < st.kv_blocks_free < total and st.kv_cache_usage > 0

    assert core.abort("b") and not core.abort("b") and core.stats().active_requests == {"a"}
    finished = []
    while core.has_unfinished():
        finished += core.step().finished
    assert [f.request_id for f in finished] == ["a"] and len(finished[0].token_ids) == 3
    st = core.stats()
    assert st.active_requests == frozenset() and st.kv_blocks_free == total and st.num_steps == 3

    closed = []
    engine.attach("part", stats=lambda: {"hits": 1}, close=lambda: closed.append(1))
    assert core.moe_stats() == {"part": {"hits": 1}}
    core.close()
    core.close()
    assert closed == [1] and core.moe_stats() == {}
