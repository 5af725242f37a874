"""Checkpoints stored quantized: which `quantization_config` moe-rt reads, and block-scaled FP8.

moe-rt reads full-precision checkpoints and one quantized format: FP8 weights (float8_e4m3fn)
with one float32 scale per block of rows x columns, the layout DeepSeek-V3 and Qwen3-FP8 ship:

    config.json  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                         "weight_block_size": [128, 128], ...}
    X.weight            float8_e4m3fn [..., N, K]
    X.weight_scale_inv  float32 [..., ceil(N / 128), ceil(K / 128)]
    w[n, k] = X.weight[n, k] * X.weight_scale_inv[n // 128, k // 128]

Edge blocks may be partial (N or K not a multiple of the block). Such weights are dequantised when
read (CheckpointReader.get), so the model holds them in its compute dtype. Tensors the config
leaves unquantized (norms, the router, lm_head) are read as they are stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_rt.errors import MoeRtError

SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Fp8Blocks:
    """Block-scaled FP8: `block` = (rows, columns) of weights sharing one scale."""
    block: tuple[int, int]


def checkpoint_quantization(hf: dict, where: str) -> Fp8Blocks | None:
    """The quantized format config.json declares (None: full precision); any other method, or an
    FP8 variant this reader does not know, is a one-line MoeRtError naming it."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise MoeRtError(f"{where}: quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise MoeRtError(f"{where}: quantization method '{method}' is not supported; moe-rt reads full-precision "
                         f"checkpoints and block-scaled fp8 (quantize experts at load with expert_bits instead)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise MoeRtError(f"{where}: fp8 format '{fmt}' is not supported (only e4m3)")
    block = q.get("weight_block_size")
    if block is None:
        raise MoeRtError(f"{where}: fp8 without weight_block_size (per-tensor scales) is not supported")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise MoeRtError(f"{where}: weight_block_size must be two positive integers, got {block!r}")
    return Fp8Blocks((block[0], block[1]))


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """float8 w [..., N, K] and scale_inv [..., ceil(N/bn), ceil(K/bk)] -> float32 [..., N, K]."""
    bn, bk = block
    N, K = w.shape[-2:]
    want = (*w.shape[:-2], -(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != want:
        raise MoeRtError(f"tensor '{name}{SCALE_SUFFIX}' has shape {tuple(scale_inv.shape)}, expected {want} "
                         f"for a {tuple(w.shape)} weight in {bn}x{bk} blocks")
    s = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
    return w.float() * s
