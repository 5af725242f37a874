"""The `parallel:` section of the config tree: how many ranks run the model and how tokens travel.

Which rank holds which expert is the `expert_parallel:` section (parallel/placement.py); the
predictor speculative shuffling uses is the `predictor:` section (residual_gate when absent).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parallel.dispatchers import KINDS


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ep: int = Field(1, ge=1, description="ranks: attention tensor-parallel, experts expert-parallel (1: one process)")
    dispatcher: str = Field(
        "alltoall", description="a registered scheme (parallel/dispatchers): alltoall, DeepSpeed-MoE's; "
                                "speculative, s-TS token shuffling")
    slack: float = Field(0.25, ge=0, description="s-TS: tokens per rank <= ceil((1 + slack) * T / N)")

    @field_validator("dispatcher")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"unknown dispatcher {v!r} (choose {', '.join(KINDS)})")
        return v
