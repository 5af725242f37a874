"""The `predictor:` section of the config tree: the one routing predictor a running engine uses.

One predictor serves every consumer: the expert cache's prefetch (cache policy predictive),
speculative token shuffling (expert-parallel dispatcher speculative), and the live-recall figure
reported in moe_stats()["predictor"].
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router_predict.registry import PREDICTOR_NAMES

RESIDUAL_GATE = "residual_gate"  # s-TS only: the next layer's router applied to this layer's input


class PredictorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="router_predict registry name: " + ", ".join(PREDICTOR_NAMES)
                    + f"; or {RESIDUAL_GATE} (expert parallelism's speculative dispatcher only)")
    dir: str | None = Field(
        None, description="trained predictor folder (learned, path) or the trace .npz a frequency or "
                          "coactivation predictor is fitted on")
    depth: int = Field(
        1, ge=1, description="MoE layers ahead it forecasts when no cache uses it (tracking only); "
                             "a predictive cache forecasts as far as its lookahead")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in (*PREDICTOR_NAMES, RESIDUAL_GATE):
            raise ValueError(f"unknown predictor {v!r}; choose from {', '.join((*PREDICTOR_NAMES, RESIDUAL_GATE))}")
        return v
