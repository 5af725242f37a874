"""The MoE block's dispatch/combine contract: a new communication scheme is one more class.

A scheme written here (rows sorted by expert before compute, as a grouped-GEMM permute step
would, and put back in combine through its typed handle) runs the MoE block and a whole model
and must give what the local dispatcher gives."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_rt.layers.moe.block import MoEBlock, MoEContext
from moe_rt.layers.moe.dispatch import DispatchOutput, Dispatcher, LocalDispatcher
from moe_rt.layers.moe.store import ResidentExpertStore
from moe_rt.models.spec import MoESpec, RoutingSpec


class SortByExpert:
    """Rows grouped by their first expert id; handle = the permutation [T] int64 applied."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # moe_index of every dispatch, to see the block used us

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[torch.Tensor]:
        self.calls.append(moe_index)
        perm = torch.argsort(topk_ids[:, 0], stable=True)
        return DispatchOutput(hidden[perm], topk_ids[perm], topk_weights[perm], perm)

    def combine(self, moe_index: int, expert_out: torch.Tensor,
                dispatched: DispatchOutput[torch.Tensor]) -> torch.Tensor:
        out = torch.empty_like(expert_out)
        out[dispatched.handle] = expert_out  # rows back in the order dispatch was given
        return out


def test_protocol_is_structural():
    assert isinstance(LocalDispatcher(), Dispatcher)
    assert isinstance(SortByExpert(), Dispatcher)

    class DispatchOnly:
        def dispatch(self, moe_index, hidden, topk_ids, topk_weights):
            return DispatchOutput(hidden, topk_ids, topk_weights, None)

    assert not isinstance(DispatchOnly(), Dispatcher)
    assert isinstance(MoEContext().dispatcher, LocalDispatcher)


def test_local_dispatch_is_the_identity_and_outputs_are_frozen():
    x, ids, w = torch.randn(5, 4), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    local = LocalDispatcher()
    d = local.dispatch(0, x, ids, w)
    assert d.hidden is x and d.topk_ids is ids and d.topk_weights is w and d.handle is None
    y = torch.randn(5, 4)
    assert local.combine(0, y, d) is y
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.hidden = y


def tiny_block(ctx: MoEContext, E=8, K=2, D=16, I=12) -> MoEBlock:
    g = torch.Generator().manual_seed(0)
    ctx.store = ResidentExpertStore([torch.randn(E, 2 * I, D, generator=g) / D**0.5],
                                    [torch.randn(E, D, I, generator=g) / I**0.5])
    spec = MoESpec(routing=RoutingSpec(num_experts=E, top_k=K), intermediate_size=I)
    block = MoEBlock(spec, D, 0, 0, ctx)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, D, generator=g))
    return block


def test_a_new_scheme_runs_the_block():
    x = torch.randn(23, 16, generator=torch.Generator().manual_seed(1))
    ref = tiny_block(MoEContext())(x)
    scheme = SortByExpert()
    got = tiny_block(MoEContext(dispatcher=scheme))(x)
    assert scheme.calls == [0]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_a_new_scheme_runs_a_model(mixtral_llm):
    ids = [5, 17, 42, 9, 77, 3, 12, 60, 61]
    ctx = mixtral_llm.model.moe_ctx
    ref = mixtral_llm.prompt_logits(ids)
    scheme, local = SortByExpert(), ctx.dispatcher
    ctx.dispatcher = scheme  # the whole swap: one attribute shared by every block
    try:
        got = mixtral_llm.prompt_logits(ids)
    finally:
        ctx.dispatcher = local
    assert scheme.calls == list(range(len(mixtral_llm.model.spec.moe_layer_ids)))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
