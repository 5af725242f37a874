"""Mixtral: softmax top-k router whose K weights are always renormalised; no shared expert."""
from __future__ import annotations

from .common import attention, base_fields, need
from .spec import MoESpec, ModelSpec, RoutingSpec


def parse(hf: dict) -> ModelSpec:
    base = base_fields(hf)
    routing = RoutingSpec(
        num_experts=need(hf, "num_local_experts"), top_k=need(hf, "num_experts_per_tok"), norm_topk_prob=True
    )
    return ModelSpec(
        **base,
        attention=attention(hf),
        moe=MoESpec(routing=routing, intermediate_size=need(hf, "intermediate_size")),
        layer_kinds=("moe",) * base["num_layers"],
        dense_intermediate_size=need(hf, "intermediate_size"),
        moe_weight_prefix="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
    )
