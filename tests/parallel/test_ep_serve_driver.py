"""EPEngineDriver and follower_loop on two real engines over one checkpoint, joined by an in-process
control channel (the real one is a gloo broadcast; test_srv_ep.py runs that end to end): the
driver is an EngineCore with nothing else to reach into, and a follower that replays its batches
ends every step in the same state as rank 0, dropping the same finished requests."""
from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest

from moe_rt.engine.core import EngineCore
from moe_rt.sampling_params import SamplingParams
from moe_rt_app.assemble import build_engine
from moe_rt_app.config import build_config
from parallel.serve_ep import Batch, EPEngineDriver, follower_loop

WAIT = 60.0


class QueueChannel:
    """ControlChannel's send/receive over a queue; keeps every batch sent for the test to read."""

    def __init__(self) -> None:
        self.q: queue.Queue[Batch] = queue.Queue()
        self.sent: list[Batch] = []

    def send(self, batch: Batch) -> None:
        self.sent.append(batch)
        self.q.put(batch)

    def receive(self) -> Batch:
        return self.q.get(timeout=WAIT)


def ep_llm(engine, group_stats: list):
    """What the driver and follower_loop use of an EPLLM: its engine and the group stats call."""
    return SimpleNamespace(llm=SimpleNamespace(engine=engine),
                           moe_stats=lambda group_view: group_stats.append(group_view) or {"ranks": 2})


@pytest.fixture
def pair(mixtral_dir):
    cfg = build_config(model=str(mixtral_dir), dtype="float32", device="cpu", max_num_seqs=4)
    leader, follower = (build_engine(cfg, progress=False).engine for _ in range(2))
    yield leader, follower
    leader.close()
    follower.close()


def test_driver_is_an_engine_core_without_engine_internals(pair):
    driver = EPEngineDriver(ep_llm(pair[0], []), QueueChannel())
    assert isinstance(driver, EngineCore)
    for internal in ("scheduler", "blocks", "requests", "spec", "output", "release", "forget", "engine"):
        assert not hasattr(driver, internal), internal


def test_follower_replays_rank_0_and_ends_every_step_in_the_same_state(pair):
    leader, follower = pair
    channel, closed, group_stats = QueueChannel(), [], []
    driver = EPEngineDriver(ep_llm(leader, group_stats), channel, on_close=lambda: closed.append(1))
    follower_results, follower_stats = [], []
    real_step = follower.step

    def recorded_step():  # what the follower's engine returns, and its state right after
        res = real_step()
        follower_results.append(res)
        follower_stats.append(follower.stats())
        return res

    follower.step = recorded_step
    steps: list[int] = []
    thread = threading.Thread(target=lambda: steps.append(follower_loop(channel, ep_llm(follower, group_stats))))
    thread.start()
    try:
        sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=2, ignore_eos=True, logprobs=1)
        a = driver.add_request("In the beginning", sampled, "a")
        b = driver.add_request([5, 17, 42], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "b")
        c = driver.add_request("Hello world", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "c")
        assert not driver.abort("no-such-request")  # not held: nothing is mirrored
        leader_results, leader_stats = [], []
        while driver.has_unfinished():
            leader_results.append(driver.step())
            leader_stats.append(driver.stats())
            if len(leader_results) == 4:
                assert driver.abort(b)
        assert driver.moe_stats() == {"ep": {"ranks": 2}}
    finally:
        driver.close()
        thread.join(WAIT)
    assert not thread.is_alive() and closed == [1]
    assert steps == [len(leader_results)]
    assert [f.request_id for r in leader_results for f in r.finished] == [c, a]
    assert follower_results == leader_results  # same deltas (logprobs too) and the same final outputs
    assert follower_stats == leader_stats  # same batch, queue and KV state after every step
    assert follower.stats().active_requests == frozenset() and not follower.has_unfinished()
    assert group_stats == [True, True]  # both ranks joined the one group read
    calls = [call[:2] for batch in channel.sent for call in batch.calls]
    assert calls == [("add", a), ("add", b), ("add", c), ("abort", b)]
    assert [batch.action for batch in channel.sent][-2:] == ["stats", "shutdown"]
    assert channel.sent[0].action == "step" and len(channel.sent[0].calls) == 3  # adds travel with the next step
