"""The MoE block: router -> (observe, forecast, prefetch) -> dispatch -> expert compute -> combine
(+ shared expert). What runs between routing and dispatch, and in which order, is in events.py.

Shape legend: T tokens, D hidden, E routed experts, K chosen per token.

The block owns only its router (and shared expert). Where expert weights live (store), how tokens
travel (dispatcher) and how experts are computed (compute) belong to one MoEContext shared by all
blocks of a model, so the engine, an expert cache or expert parallelism can swap them after the
model is built without touching the model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_rt.models.spec import MoESpec

from ..linear import Linear, linear
from ..mlp import DenseMLP
from .compute import ExpertCompute, torch_experts
from .dispatch import Dispatcher, LocalDispatcher
from .events import RouterEvent, RoutingHub
from .routing import DynamicTopK, route
from .store import ExpertStore


@dataclass
class MoEContext:
    store: ExpertStore | None = None
    compute: ExpertCompute = torch_experts
    dispatcher: Dispatcher = field(default_factory=LocalDispatcher)
    hub: RoutingHub = field(default_factory=RoutingHub)
    dynamic_topk: DynamicTopK | None = None  # drops low-weight choices (-1) after routing; None = off


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, hidden: int, moe_index: int, layer_id: int, ctx: MoEContext) -> None:
        super().__init__()
        r = spec.routing
        self.spec, self.moe_index, self.layer_id, self.ctx = spec, moe_index, layer_id, ctx
        self.gate = Linear(hidden, r.num_experts, bias=False)
        if r.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(r.num_experts))
        else:
            self.e_score_correction_bias = None
        self.shared_expert = DenseMLP(hidden, spec.shared_intermediate_size) if spec.shared_intermediate_size else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if spec.shared_gate and self.shared_expert else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        r = self.spec.routing
        w = self.gate.weight
        logits = linear(x.float(), w.float()) if r.logits_fp32 and x.dtype != torch.float32 else linear(x, w)
        weights, ids = route(logits, r, self.e_score_correction_bias)
        if ctx.dynamic_topk is not None:  # before observers: they see the experts actually computed
            weights, ids = ctx.dynamic_topk(weights, ids, r)
        if ctx.hub.active:  # the order after routing is a contract (events.py), held by a test
            event = RouterEvent(self.moe_index, self.layer_id, x, logits, ids, weights, ctx.hub.batch)
            ctx.hub.observe(event)
            # Forecasts for layers l+1..l+D need layer l's routing, so they are made here, and reach
            # the store before prepare(l): it issues their copies after l's own demand loads.
            forecasts = ctx.hub.forecast(event)
            if forecasts:
                ctx.store.prefetch(forecasts)
        d = ctx.dispatcher.dispatch(self.moe_index, x, ids, weights)
        experts = ctx.store.prepare(self.moe_index, d.topk_ids)
        # Choices mapped to no slot run where their weights are. Order: the host part is started
        # before the device kernels are queued, so it waits only for its inputs, and finished
        # after, so the host computes while the device does (a test holds this order).
        finish = None
        if experts.host_compute is not None:
            finish = experts.host_compute(d.hidden, d.topk_ids, d.topk_weights)
        y = ctx.compute(d.hidden, experts.w13, experts.w2, experts.slots(d.topk_ids), d.topk_weights)
        if finish is not None:
            y = y + finish()
        out = ctx.dispatcher.combine(self.moe_index, y, d)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
