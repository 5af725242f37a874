"""The `parallel:` section of the config tree: how many ranks run the model and how tokens travel.

Which rank holds which expert is the `expert_parallel:` section (parallel/placement.py); the
predictor speculative shuffling uses is the `predictor:` section (residual_gate when absent).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ep: int = Field(1, ge=1, description="ranks: attention tensor-parallel, experts expert-parallel (1: one process)")
    dispatcher: Literal["alltoall", "speculative"] = Field(
        "alltoall", description="alltoall: DeepSpeed-MoE's scheme; speculative: s-TS token shuffling")
    slack: float = Field(0.25, ge=0, description="s-TS: tokens per rank <= ceil((1 + slack) * T / N)")
