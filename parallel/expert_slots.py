"""Cut a rank's experts out of a resident weight stack: full-precision, quantized, or at
per-expert widths (a MixedStack of a bits plan).

A QuantizedStack (moe_rt/quant/experts.py) is indexed by slot in every operand it holds: codes,
scales, zeros and the CPU kernels' copies. Quantization is per slot (int8: per output row; int4:
per group of input columns of a row), so the slots taken are bit for bit the ones the
single-process model computes with, and a rank's stack stays as small as its share.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from moe_rt.quant.experts import CpuLowBit, QuantizedStack
from moe_rt.quant.mixed import MixedStack


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


def by_part(w: torch.Tensor | QuantizedStack | MixedStack, slots: list[int]) -> list[int]:
    """`slots` reordered so that a MixedStack's parts come in order (stable within a part): the
    order take_slots keeps them in, so a rank's slot i is the i-th of the returned list. Other
    stacks keep the order given."""
    if not isinstance(w, MixedStack):
        return list(slots)
    ends = [o + p.shape[0] for o, p in zip(w.offsets, w.parts)]
    return sorted(slots, key=lambda s: next(i for i, end in enumerate(ends) if s < end))


def take_mixed_slots(w: torch.Tensor | QuantizedStack | MixedStack,
                     slots: torch.Tensor) -> torch.Tensor | QuantizedStack | MixedStack:
    """take_slots for any stack; a MixedStack's `slots` must come grouped by part (by_part): each
    part keeps its selected slots, and parts left without any are dropped (one is kept if all
    are, so the stack still has a shape)."""
    if not isinstance(w, MixedStack):
        return take_slots(w, slots)
    parts = []
    for o, p in zip(w.offsets, w.parts):
        sel = slots[(slots >= o) & (slots < o + p.shape[0])] - o
        if sel.numel():
            parts.append(take_slots(p, sel))
    return MixedStack(tuple(parts) or (take_slots(w.parts[0], slots[:0]),))
