"""The whole config tree, validated once at start-up: the core's model and engine sections, the
expert cache's, the routing predictor's and expert parallelism's, composed here because this
layer is the only one that sees every package.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expert_cache.config import CacheConfig
from moe_rt.config import EngineConfig, ModelConfig
from moe_rt.errors import MoeRtError, validation_detail


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

    def model_section(self) -> ModelConfig:
        return ModelConfig(model=self.model, dtype=self.dtype, device=self.device)


def build_config(**kwargs) -> RuntimeConfig:
    """RuntimeConfig from flat keyword options: engine fields are matched by name."""
    engine_keys = set(EngineConfig.model_fields)
    engine = {k: kwargs.pop(k) for k in list(kwargs) if k in engine_keys}
    try:
        return RuntimeConfig(engine=EngineConfig(**engine), **kwargs)
    except ValidationError as e:
        raise MoeRtError(f"invalid option {validation_detail(e)}") from None
