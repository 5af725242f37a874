"""Architecture name (config.json `architectures[0]`) -> parser producing a ModelSpec."""
from __future__ import annotations

from typing import Callable

from moe_rt.errors import MoeRtError
from moe_rt.quant.checkpoint import checkpoint_quantization

from . import deepseek, mixtral, olmoe, qwen_moe
from .spec import ModelSpec

PARSERS: dict[str, Callable[[dict], ModelSpec]] = {
    "MixtralForCausalLM": mixtral.parse,
    "Qwen2MoeForCausalLM": qwen_moe.parse_qwen2,
    "Qwen3MoeForCausalLM": qwen_moe.parse_qwen3,
    "OlmoeForCausalLM": olmoe.parse,
    "DeepseekV2ForCausalLM": deepseek.parse_v2,
    "DeepseekV3ForCausalLM": deepseek.parse_v3,
}


def parse_config(hf: dict) -> ModelSpec:
    archs = hf.get("architectures") or []
    if not archs:
        raise MoeRtError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in PARSERS:
        raise MoeRtError(f"unsupported architecture {arch} (supported: {', '.join(sorted(PARSERS))})")
    # A quantized checkpoint in a format the reader cannot dequantise would load silently wrong.
    checkpoint_quantization(hf, "config.json")
    if hf.get("hidden_act", "silu") != "silu":
        raise MoeRtError(f"hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    return PARSERS[arch](hf)
