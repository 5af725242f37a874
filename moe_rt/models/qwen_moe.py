"""Qwen2-MoE (qkv bias, shared expert behind a sigmoid gate) and Qwen3-MoE (per-head q/k RMSNorm)."""
from __future__ import annotations

from .common import attention, base_fields, need, sparse_layer_kinds
from .spec import MoESpec, ModelSpec, RoutingSpec


def _routing(hf: dict) -> RoutingSpec:
    return RoutingSpec(
        num_experts=hf.get("num_experts") or need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def parse_qwen2(hf: dict) -> ModelSpec:
    base = base_fields(hf)
    return ModelSpec(
        **base,
        attention=attention(hf, qkv_bias=bool(hf.get("qkv_bias", True))),
        moe=MoESpec(
            routing=_routing(hf),
            intermediate_size=need(hf, "moe_intermediate_size"),
            shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
            shared_gate=True,
        ),
        layer_kinds=sparse_layer_kinds(hf, base["num_layers"]),
        dense_intermediate_size=need(hf, "intermediate_size"),
    )


def parse_qwen3(hf: dict) -> ModelSpec:
    base = base_fields(hf)
    return ModelSpec(
        **base,
        attention=attention(hf, qkv_bias=bool(hf.get("attention_bias", False)), qk_norm="head"),
        moe=MoESpec(routing=_routing(hf), intermediate_size=need(hf, "moe_intermediate_size")),
        layer_kinds=sparse_layer_kinds(hf, base["num_layers"]),
        dense_intermediate_size=need(hf, "intermediate_size"),
    )
