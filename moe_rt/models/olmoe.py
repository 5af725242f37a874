"""OLMoE: q/k RMSNorm over the whole projection (not per head), optional clip_qkv, softmax router."""
from __future__ import annotations

from .common import attention, base_fields, need
from .spec import MoESpec, ModelSpec, RoutingSpec


def parse(hf: dict) -> ModelSpec:
    base = base_fields(hf)
    routing = RoutingSpec(
        num_experts=hf.get("num_experts") or need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )
    return ModelSpec(
        **base,
        attention=attention(
            hf, qkv_bias=bool(hf.get("attention_bias", False)), qk_norm="full", clip_qkv=hf.get("clip_qkv")
        ),
        moe=MoESpec(routing=routing, intermediate_size=need(hf, "intermediate_size")),
        layer_kinds=("moe",) * base["num_layers"],
        dense_intermediate_size=need(hf, "intermediate_size"),
    )
