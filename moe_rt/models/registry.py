"""Architecture name (config.json `architectures[0]`) -> parser producing a ModelSpec."""
from __future__ import annotations

from typing import Callable

from moe_rt.errors import MoeRtError

from . import mixtral, olmoe, qwen_moe
from .spec import ModelSpec

PARSERS: dict[str, Callable[[dict], ModelSpec]] = {
    "MixtralForCausalLM": mixtral.parse,
    "Qwen2MoeForCausalLM": qwen_moe.parse_qwen2,
    "Qwen3MoeForCausalLM": qwen_moe.parse_qwen3,
    "OlmoeForCausalLM": olmoe.parse,
}

_LATER = {
    "DeepseekV2ForCausalLM": "DeepSeek-V2 MLA attention is not supported yet (its MoE block is)",
    "DeepseekV3ForCausalLM": "DeepSeek-V3 MLA attention is not supported yet (its MoE block is)",
}


def parse_config(hf: dict) -> ModelSpec:
    archs = hf.get("architectures") or []
    if not archs:
        raise MoeRtError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch in _LATER:
        raise MoeRtError(f"architecture {arch}: {_LATER[arch]}")
    if arch not in PARSERS:
        raise MoeRtError(f"unsupported architecture {arch} (supported: {', '.join(sorted(PARSERS))})")
    if hf.get("hidden_act", "silu") != "silu":
        raise MoeRtError(f"hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    return PARSERS[arch](hf)
