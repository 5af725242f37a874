"""DeepSeek-V2/V3 MoE blocks: softmax (V2) or sigmoid + e_score_correction_bias (V3) scoring,
group-limited top-k, routed_scaling_factor, shared experts and first_k_dense_replace dense layers.

Only the MoE block is supported for now; MLA attention is not, so whole DeepSeek checkpoints are
refused with a clear error by the registry while `routing_spec` serves block-level use and tests.
"""
from __future__ import annotations

from .common import need
from .spec import MoESpec, RoutingSpec


def routing_spec(hf: dict) -> RoutingSpec:
    v3 = hf.get("model_type") == "deepseek_v3" or hf.get("scoring_func") == "sigmoid"
    method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    grouped = method in ("group_limited_greedy", "noaux_tc")
    return RoutingSpec(
        num_experts=hf.get("n_routed_experts") or need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        scoring="sigmoid" if v3 else "softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=int(hf.get("n_group") or 1) if grouped else 1,
        topk_group=int(hf.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if v3 else "max",
        correction_bias=v3,
        logits_fp32=True,
    )


def moe_spec(hf: dict) -> MoESpec:
    shared = int(hf.get("n_shared_experts") or 0)
    inter = need(hf, "moe_intermediate_size")
    return MoESpec(routing=routing_spec(hf), intermediate_size=inter, shared_intermediate_size=shared * inter)


def layer_kinds(hf: dict) -> tuple[str, ...]:
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    freq = int(hf.get("moe_layer_freq") or 1)
    n = need(hf, "num_hidden_layers")
    return tuple("moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(n))
