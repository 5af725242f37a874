"""Reading Hugging Face config.json fields shared by the families."""
from __future__ import annotations

from typing import Any

from moe_rt.errors import MoeRtError

from .spec import AttentionSpec


def need(hf: dict, key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise MoeRtError(f"config.json of {hf.get('architectures', ['?'])[0]} lacks '{key}'")
    return hf[key]


def rope_parameters(hf: dict, default_theta: float = 10000.0) -> tuple[str, float, dict]:
    """(rope type, theta, all rope settings). transformers v5 writes rope_parameters; v4 and hub
    checkpoints write rope_theta/rope_scaling (with 'type' or 'rope_type')."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return rope_type, float(params.get("rope_theta", hf.get("rope_theta", default_theta))), params


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    rope_type, theta, _ = rope_parameters(hf, default)
    if rope_type != "default":
        raise MoeRtError(f"rope type '{rope_type}' is not supported yet (only default RoPE)")
    return theta


def attention(hf: dict, **kw) -> AttentionSpec:
    heads = need(hf, "num_attention_heads")
    hidden = need(hf, "hidden_size")
    return AttentionSpec(
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope_theta=rope_theta(hf),
        **kw,
    )


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def sparse_layer_kinds(hf: dict, num_layers: int) -> tuple[str, ...]:
    """Qwen-MoE rule: a layer is MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step") or 1
    return tuple(
        "moe" if i not in mlp_only and (i + 1) % step == 0 else "dense" for i in range(num_layers)
    )


def sliding_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None
    if not window:
        return (None,) * num_layers
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    first_sliding = hf.get("max_window_layers", 0) if "use_sliding_window" in hf else 0
    return tuple(window if i >= first_sliding else None for i in range(num_layers))


def base_fields(hf: dict) -> dict:
    n = need(hf, "num_hidden_layers")
    return dict(
        architecture=hf["architectures"][0],
        vocab_size=need(hf, "vocab_size"),
        hidden_size=need(hf, "hidden_size"),
        num_layers=n,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_windows=sliding_windows(hf, n),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
