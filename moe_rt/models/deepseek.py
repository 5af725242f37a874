"""DeepSeek-V2/V3: Multi-head Latent Attention (layers/mla.py), YaRN rotary scaling, and MoE blocks
with softmax (V2) or sigmoid + e_score_correction_bias (V3) scoring, group-limited top-k,
routed_scaling_factor, shared experts and first_k_dense_replace dense layers.

Quirks of transformers (the reference) matched here:
- a config.json without q_lora_rank gets transformers' default 1536 (V2-Lite writes null: q_proj);
- V3's rope_interleave defaults to True when absent (hub V3 configs predate the field); V2 always
  interleaves (it rotates complex pairs);
- transformers ignores moe_layer_freq (every layer from first_k_dense_replace on is MoE); we follow
  DeepSeek's own rule (also layer % moe_layer_freq == 0). Every released checkpoint has freq 1,
  where both agree;
- V3's multi-token-prediction layers (num_nextn_predict_layers, stored as layer num_hidden_layers)
  are not used for generation and are not loaded, as in transformers.
"""
from __future__ import annotations

from moe_rt.errors import MoeRtError
from moe_rt.layers.yarn import softmax_mscale

from .common import base_fields, need, rope_parameters
from .spec import AttentionSpec, MLASpec, ModelSpec, MoESpec, RoutingSpec, YarnSpec

_TRANSFORMERS_Q_LORA_RANK = 1536


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


def yarn_spec(hf: dict) -> tuple[float, YarnSpec | None]:
    """(rope_theta, YaRN settings or None for plain RoPE); any other scaling type is refused."""
    rope_type, theta, p = rope_parameters(hf)
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise MoeRtError(f"DeepSeek rope type '{rope_type}' is not supported (only default and yarn)")
    original = p.get("original_max_position_embeddings")
    if not original:
        raise MoeRtError("yarn rope_scaling lacks 'original_max_position_embeddings'")
    # transformers: a missing factor is the context extension max_position_embeddings / original
    factor = p.get("factor") or need(hf, "max_position_embeddings") / original
    return theta, YarnSpec(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(p.get("beta_fast") or 32),
        beta_slow=float(p.get("beta_slow") or 1),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        attention_factor=p.get("attention_factor"),
        truncate=bool(p.get("truncate", True)),
    )


def mla_attention(hf: dict, v3: bool) -> AttentionSpec:
    theta, yarn = yarn_spec(hf)
    nope, rope = need(hf, "qk_nope_head_dim"), need(hf, "qk_rope_head_dim")
    mla = MLASpec(
        kv_lora_rank=need(hf, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=need(hf, "v_head_dim"),
        softmax_scale=(nope + rope) ** -0.5 * softmax_mscale(yarn),
        q_lora_rank=hf["q_lora_rank"] if "q_lora_rank" in hf else _TRANSFORMERS_Q_LORA_RANK,
        rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,
        attention_bias=bool(hf.get("attention_bias", False)),
    )
    return AttentionSpec(
        num_heads=need(hf, "num_attention_heads"), num_kv_heads=1, head_dim=mla.qk_head_dim,
        rope_theta=theta, yarn=yarn, mla=mla,
    )


def _parse(hf: dict, v3: bool) -> ModelSpec:
    base = base_fields(hf)
    if any(base["sliding_windows"]):
        raise MoeRtError("sliding-window attention is not supported with MLA (DeepSeek) attention")
    return ModelSpec(
        **base,
        attention=mla_attention(hf, v3),
        moe=moe_spec(hf),
        layer_kinds=layer_kinds(hf),
        dense_intermediate_size=need(hf, "intermediate_size"),
    )


def parse_v2(hf: dict) -> ModelSpec:
    return _parse(hf, v3=False)


def parse_v3(hf: dict) -> ModelSpec:
    return _parse(hf, v3=True)
