"""YaRN rotary scaling (Peng et al. 2023), as transformers computes it (`_compute_yarn_parameters`),
so checkpoints trained with it (DeepSeek-V2-Lite, V3) see the frequencies they were trained on.

Each rotary frequency is blended between its original value (extrapolation: fast-rotating
dimensions, which already wrap many times inside the original context) and value/factor
(interpolation: slow dimensions, which must be stretched to cover the longer context), with a
linear ramp between the dimensions that rotate beta_fast and beta_slow times over
original_max_position_embeddings. cos/sin are then scaled by an attention factor.
"""
from __future__ import annotations

import math

import torch

from moe_rt.models.spec import YarnSpec


def mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `scale`-times longer; 1 when not extended."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def attention_factor(y: YarnSpec) -> float:
    """Scale applied to cos and sin. DeepSeek sets mscale == mscale_all_dim, which makes it 1 and
    moves the whole correction into the softmax scale (see softmax_mscale)."""
    if y.attention_factor is not None:
        return y.attention_factor
    if y.mscale and y.mscale_all_dim:  # truthiness as in transformers: 0 or None falls back
        return mscale(y.factor, y.mscale) / mscale(y.factor, y.mscale_all_dim)
    return mscale(y.factor)


def softmax_mscale(y: YarnSpec | None) -> float:
    """Factor on DeepSeek's softmax scale: mscale(factor, mscale_all_dim)**2, or 1."""
    if y is None or not y.mscale_all_dim:
        return 1.0
    return mscale(y.factor, y.mscale_all_dim) ** 2


def inv_freq(dim: int, theta: float, y: YarnSpec, device=None) -> torch.Tensor:
    """[dim/2] float32 inverse frequencies."""

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp  # 1 for fast dimensions: keep the original frequency
    # Written as transformers writes it (1 - extrapolate, not ramp) so the float32 rounding matches.
    return (1.0 / (y.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
