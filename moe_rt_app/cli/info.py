"""`moe-rt info`: what a model folder holds, without loading the weights."""
from __future__ import annotations

import argparse
import json
import math

from moe_rt.checkpoint import CheckpointReader
from moe_rt.loader import load_spec
from moe_rt.quant.checkpoint import SCALE_SUFFIX


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--json", action="store_true")


# Bytes per element of the safetensors dtypes a checkpoint may hold.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def model_info(model_dir: str) -> dict:
    spec = load_spec(model_dir)
    reader = CheckpointReader(model_dir)
    total = expert = expert_bytes = 0
    by_dtype: dict[str, int] = {}
    for name in reader.weight_map:
        shape, dtype = reader.tensor_info(name)
        n = math.prod(shape)
        if ".experts." in name:
            expert_bytes += n * DTYPE_BYTES.get(dtype, 2)
        if reader.fp8 is not None and name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in reader.weight_map:
            continue  # an FP8 weight's block scales: storage, not parameters
        total += n
        if ".experts." in name:
            expert += n
        by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    # The float dtype most parameters are stored in, FP8 aside (the compute dtype of an FP8 checkpoint).
    floats = {d: n for d, n in by_dtype.items() if d in ("F32", "F16", "BF16")}
    dtype_bytes = DTYPE_BYTES[max(floats, key=floats.get)] if floats else 2
    L, E, K = len(spec.moe_layer_ids), spec.num_experts, spec.top_k
    per_expert = 3 * spec.hidden_size * spec.moe.intermediate_size
    active = total - expert + L * K * per_expert
    q = reader.fp8
    return {
        "architecture": spec.architecture,
        "quantization": f"fp8 block {q.block[0]}x{q.block[1]}" if q is not None else "none",
        "layers": spec.num_layers,
        "moe_layers": L,
        "hidden_size": spec.hidden_size,
        **attention_info(spec, dtype_bytes),
        "vocab_size": spec.vocab_size,
        "experts_per_layer": E,
        "experts_per_token": K,
        "shared_expert_intermediate": spec.moe.shared_intermediate_size,
        "parameters_total": total,
        "parameters_experts": expert,
        "parameters_active_per_token": active,
        "checkpoint_dtype_bytes": dtype_bytes,
        # as stored (FP8 scales included), from the expert tensors themselves when the names show them
        "bytes_per_expert": expert_bytes // (L * E) if expert_bytes else per_expert * dtype_bytes,
        "max_position_embeddings": spec.max_position_embeddings,
    }


def attention_info(spec, dtype_bytes: int) -> dict:
    """Attention kind, heads and what one token costs in the KV cache (all layers, checkpoint dtype)."""
    a = spec.attention
    out = {"attention": "MLA" if a.mla is not None else "GQA", "heads": a.num_heads}
    if a.mla is None:
        out["kv_heads"] = a.num_kv_heads
        out["head_dim"] = a.head_dim
    else:
        m = a.mla
        out.update({
            "q_lora_rank": m.q_lora_rank if m.q_lora_rank is not None else "none (q_proj)",
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
        })
    out["rope"] = f"yarn x{a.yarn.factor:g} from {a.yarn.original_max_position_embeddings}" if a.yarn else "default"
    out["kv_cache_bytes_per_token"] = spec.num_layers * a.kv_bytes_per_token(dtype_bytes)
    return out


def run(args) -> int:
    from moe_rt.checkpoint import default_model_dir

    info = model_info(args.model or default_model_dir())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0
