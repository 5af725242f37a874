"""Cut a rank's experts out of a resident weight stack, full-precision or quantized.

A QuantizedStack (moe_rt/quant/experts.py) is indexed by slot in every operand it holds: codes,
scales, zeros and the CPU kernels' copies. Quantization is per slot (int8: per output row; int4:
per group of input columns of a row), so the slots taken are bit for bit the ones the
single-process model computes with, and a rank's stack stays as small as its share.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from moe_rt.quant.experts import CpuLowBit, QuantizedStack


def take_slots(w: torch.Tensor | QuantizedStack, slots: torch.Tensor) -> torch.Tensor | QuantizedStack:
    """w [S, N, K] -> [len(slots), N, K]: the given slots (int64 on w's device), in that order."""
    if not isinstance(w, QuantizedStack):
        return w[slots]
    codes = w.codes[slots]
    cpu = None
    if w.cpu is not None:
        # The CPU kernel may read the stack's own codes (int8, and int4 in the "cpu_int4" layout):
        # keep them one tensor, so nbytes() counts them once, as it does for the whole stack.
        qweight = codes if w.cpu.qweight is w.codes else w.cpu.qweight[slots]
        cpu = CpuLowBit(qweight, w.cpu.scales[slots])
    zeros = None if w.zeros is None else w.zeros[slots]
    return replace(w, codes=codes, scales=w.scales[slots], zeros=zeros, cpu=cpu)
