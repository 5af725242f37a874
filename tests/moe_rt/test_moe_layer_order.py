"""The order of work inside each MoE layer is a contract (moe_rt/layers/moe/events.py):

    route -> observe -> forecast -> prefetch -> dispatch -> prepare -> compute -> combine

and the step's BatchInfo reaches the router events of exactly its own forward, through the engine.
"""
from contextlib import contextmanager

import pytest
import torch

from moe_rt.layers.moe.events import BatchInfo, Forecast, RoutingHub
from moe_rt.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


class Boom(Exception):
    pass


class Recording:
    """Observer, forecaster, store, dispatcher and expert compute of one model, each logging its
    call (and the hub's BatchInfo at that moment) in one list."""

    def __init__(self, model, fail_at: int | None = None):
        ctx = model.moe_ctx
        self.hub, self.num_layers, self.num_experts = ctx.hub, len(model.moe_blocks()), model.spec.num_experts
        self.inner = (ctx.store, ctx.dispatcher, ctx.compute)
        self.fail_at = fail_at
        self.log: list[tuple] = []
        self.events = []

    def observe(self, event):
        assert event.batch is self.hub.batch  # the event carries the forward's own rows
        self.events.append(event)
        self.log.append(("observe", event.moe_index))

    def forecast(self, event):
        self.log.append(("forecast", event.moe_index))
        nxt = event.moe_index + 1
        return [Forecast(nxt, torch.ones(self.num_experts), 1)] if nxt < self.num_layers else []

    def prefetch(self, forecasts):
        self.log.append(("prefetch", [f.target for f in forecasts]))

    def prepare(self, moe_index, topk_ids):
        self.log.append(("prepare", moe_index))
        if moe_index == self.fail_at:
            raise Boom(f"layer {moe_index}")
        return self.inner[0].prepare(moe_index, topk_ids)

    def dispatch(self, moe_index, *args):
        self.log.append(("dispatch", moe_index))
        return self.inner[1].dispatch(moe_index, *args)

    def combine(self, moe_index, *args):
        self.log.append(("combine", moe_index))
        return self.inner[1].combine(moe_index, *args)

    def compute(self, *args):
        self.log.append(("compute",))
        return self.inner[2](*args)


@contextmanager
def recording(model, **kw):
    rec = Recording(model, **kw)
    ctx = model.moe_ctx
    ctx.store, ctx.dispatcher, ctx.compute = rec, rec, rec.compute
    unsubscribe, unset = ctx.hub.subscribe(rec.observe), ctx.hub.set_forecaster(rec)
    try:
        yield rec
    finally:
        unsubscribe()
        unset()
        ctx.store, ctx.dispatcher, ctx.compute = rec.inner


def one_forward(L):
    """The log of one forward: every layer in the contract's order; no prefetch after the last
    layer, which has nothing left to forecast."""
    out = []
    for l in range(L):
        out += [("observe", l), ("forecast", l)]
        out += [("prefetch", [l + 1])] if l + 1 < L else []
        out += [("dispatch", l), ("prepare", l), ("compute",), ("combine", l)]
    return out


def test_each_layer_forecasts_after_routing_and_prefetches_before_preparing(mixtral_llm):
    model = mixtral_llm.model
    with recording(model) as rec:
        out = mixtral_llm.generate("In the beginning", PARAMS)[0].outputs[0].token_ids
    L = rec.num_layers
    assert L >= 2
    assert rec.log == one_forward(L) * 3  # a prefill and two decode steps
    # Holds for any forecaster: the forecast for layer l+1 comes after layer l routed, and the store
    # has it before it prepares layer l (so it can issue copies after l's own loads) and l+1.
    for l in range(L - 1):
        first = rec.log.index(("forecast", l))
        assert rec.log.index(("observe", l)) < first < rec.log.index(("prefetch", [l + 1]))
        assert rec.log.index(("prefetch", [l + 1])) < rec.log.index(("prepare", l)) < rec.log.index(("prepare", l + 1))
    # Each forward's events carry that step's rows, and only inside that forward.
    assert model.hub.batch is None
    steps = [e.batch.step for e in rec.events]
    assert steps == [s for s in sorted(set(steps)) for _ in range(L)] and len(set(steps)) == 3
    assert steps[-1] == mixtral_llm.engine.runner.step_count - 1
    prompt = mixtral_llm.tokenizer.encode("In the beginning")
    per_step = [rec.events[i * L].batch for i in range(3)]
    assert [b.token_ids.tolist() for b in per_step] == [prompt, out[:1], out[1:2]]
    assert [b.positions.tolist() for b in per_step] == [list(range(len(prompt))), [len(prompt)], [len(prompt) + 1]]


def test_a_scoring_forward_belongs_to_no_step(mixtral_llm):
    with recording(mixtral_llm.model) as rec:
        mixtral_llm.prompt_logits([5, 6, 7])
    assert rec.log == one_forward(rec.num_layers)
    assert [e.batch for e in rec.events] == [None] * rec.num_layers


def test_a_failing_forward_leaves_no_step_context_behind(mixtral_llm):
    engine, model = mixtral_llm.engine, mixtral_llm.model
    rid = engine.add_request([5, 6, 7], PARAMS)
    try:
        with recording(model, fail_at=1) as rec:
            with pytest.raises(Boom):
                engine.step()
            assert model.hub.batch is None  # even though the forward never finished
            assert rec.log[-1] == ("prepare", 1) and rec.events[0].batch is not None
    finally:
        engine.abort(rid)
    # The next forward runs clean: the model's parts are back and nothing of the failed step stays.
    again = mixtral_llm.generate([5, 6, 7], PARAMS)[0].outputs[0].token_ids
    assert len(again) == 3 and model.hub.batch is None and not model.hub.active


def test_hub_forward_scopes_and_restores_batch():
    hub = RoutingHub()
    a = BatchInfo(0, torch.tensor([1]), torch.tensor([0]), torch.tensor([9]))
    b = BatchInfo(1, torch.tensor([2]), torch.tensor([0]), torch.tensor([8]))
    with hub.forward(a):
        assert hub.batch is a
        with pytest.raises(Boom):
            with hub.forward(b):
                assert hub.batch is b
                raise Boom
        assert hub.batch is a
    assert hub.batch is None


def test_one_forecaster_per_hub_and_active_with_it_alone():
    hub = RoutingHub()
    assert not hub.active and hub.forecast(None) == ()

    class Fc:
        def forecast(self, event):
            return [Forecast(1, torch.ones(2), 1)]

    unset = hub.set_forecaster(Fc())
    assert hub.active and [f.target for f in hub.forecast(None)] == [1]
    with pytest.raises(RuntimeError, match="already has a forecaster"):
        hub.set_forecaster(Fc())
    unset()
    assert not hub.active
