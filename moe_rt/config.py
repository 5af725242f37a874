"""The typed configuration tree, validated once at start-up.

Values discovered at start-up (KV blocks, max_model_len after the budget) live in the engine's
runtime state, never written back here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expert_cache.config import CacheConfig
from moe_rt.errors import MoeRtError, validation_detail


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together at most (running batch)")
    max_num_batched_tokens: int = Field(2048, ge=1, description="prompt tokens in one prefill step (a longer prompt runs alone)")
    max_model_len: int | None = Field(None, ge=2, description="context length (prompt + output); default: the model's, capped by the KV budget")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="memory for the paged KV cache")
    kv_block_size: int = Field(16, ge=1, description="tokens per KV block")
    expert_compute: Literal["torch", "loop", "triton", "reference"] = Field("torch", description="expert-compute backend")
    seed: int = Field(0, description="seed of the sampler for requests without their own seed")


class RuntimeConfig(BaseModel):
    """Everything `LLM(...)` and `moe-rt` need: model, numerics, engine, placement."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="Hugging Face checkpoint folder")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    placement: str | None = Field(None, description="expert-placement YAML file (docs/placement.md)")
    cache: CacheConfig | None = Field(
        None, description="expert-cache settings; override the placement file's cache section (docs/placement.md)"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    predictor: str | None = Field(
        None, description="routing predictor run online to report its live recall (gate_lookahead, "
                          "gate_lookahead_output, learned, path, "
                          "frequency, coactivation); the expert cache runs its own for prefetch"
    )
    predictor_dir: str | None = Field(
        None, description="trained predictor folder (learned, path) or a fit trace .npz (frequency, coactivation)"
    )
    predictor_depth: int = Field(1, ge=1, description="MoE layers ahead the online predictor forecasts")


def build_config(**kwargs) -> RuntimeConfig:
    """RuntimeConfig from flat keyword options: engine fields are matched by name."""
    engine_keys = set(EngineConfig.model_fields)
    engine = {k: kwargs.pop(k) for k in list(kwargs) if k in engine_keys}
    try:
        return RuntimeConfig(engine=EngineConfig(**engine), **kwargs)
    except ValidationError as e:
        raise MoeRtError(f"invalid option {validation_detail(e)}") from None
