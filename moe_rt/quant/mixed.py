"""Mixed-width expert stacks: one MoE layer's slots at more than one bitwidth (docs/quantization.md,
"Per-expert bitwidth plans").

Shape legend: S slots, N output rows, K input columns of one expert matrix (w13: N = 2I, K = D;
w2: N = D, K = I); T tokens, D hidden, K choices per token in the compute's routing arguments.

A MixedStack is a layer's S slots cut into contiguous parts; part p holds slots
offsets[p] .. offsets[p] + S_p - 1, as a dense tensor in the compute dtype ("full") or a
QuantizedStack (8 or 4 bits). It says nothing of how its parts were made: the resident store
quantizes a permuted checkpoint stack into them, an expert cache may hand one slot pool per width
(virtual slot = part offset + slot in the pool). w13 and w2 of a layer share one part split.

The compute (`mixed_experts`) runs each part through the backend for its kind with the slots of
the other parts marked -1 (the backends skip those choices), and adds the parts' outputs in
float32, rounded once to hidden's dtype: with one part that is the part's own output, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from moe_rt.errors import MoeRtError
from moe_rt.quant.experts import QuantizedStack, as_dense, quantize_experts
from moe_rt.quant.plan import WIDTHS, Width
Part = Union[torch.Tensor, QuantizedStack]


def width_of(part: Part) -> Width:
    return part.bits if isinstance(part, QuantizedStack) else "full"


def part_nbytes(part: Part) -> int:
    return part.nbytes() if isinstance(part, QuantizedStack) else part.numel() * part.element_size()


@dataclass(frozen=True)
class MixedStack:
    """Stands in for a weight stack [S, N, K] of the compute dtype, its slots split into parts."""
    parts: tuple[Part, ...]  # each [S_p, N, K]; at least one

    def __post_init__(self) -> None:
        if not self.parts:
            raise MoeRtError("a MixedStack needs at least one part")
        if len({tuple(p.shape[1:]) for p in self.parts}) != 1:
            raise MoeRtError(f"MixedStack parts differ in matrix shape: {[tuple(p.shape) for p in self.parts]}")

    @property
    def offsets(self) -> tuple[int, ...]:
        """First slot of each part."""
        out, o = [], 0
        for p in self.parts:
            out.append(o)
            o += p.shape[0]
        return tuple(out)

    @property
    def widths(self) -> tuple[Width, ...]:
        return tuple(width_of(p) for p in self.parts)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dequantize(self) -> torch.Tensor:
        """The dense [S, N, K] stack in the compute dtype: the obviously-right reading."""
        return torch.cat([as_dense(p) for p in self.parts])

    def nbytes(self) -> int:
        return sum(part_nbytes(p) for p in self.parts)

    def bytes_by_width(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.parts:
            key = str(width_of(p))
            out[key] = out.get(key, 0) + part_nbytes(p)
        return out


def as_dense_any(w: torch.Tensor | QuantizedStack | MixedStack) -> torch.Tensor:
    """Any weight stack as a plain tensor (slow paths only)."""
    return w.dequantize() if isinstance(w, MixedStack) else as_dense(w)


def stack_bytes_by_width(w: torch.Tensor | QuantizedStack | MixedStack) -> dict[str, int]:
    """{"full" | "8" | "4": bytes} of one weight stack."""
    if isinstance(w, MixedStack):
        return w.bytes_by_width()
    return {str(width_of(w)): part_nbytes(w)}


ExpertCompute = Callable[[torch.Tensor, Part, Part, torch.Tensor, torch.Tensor], torch.Tensor]


def mixed_experts(hidden, w13: MixedStack, w2: MixedStack, topk_ids, topk_weights,
                  compute: ExpertCompute) -> torch.Tensor:
    """hidden [T, D], topk_ids [T, K] slots of the MixedStacks (-1 = skip) -> [T, D] in hidden's dtype.
    `compute` runs one part (a dense tensor or a QuantizedStack) with the expert-compute contract."""
    if w13.offsets != w2.offsets:
        raise MoeRtError(f"w13 and w2 split their slots differently: {w13.offsets} vs {w2.offsets}")
    if len(w13.parts) == 1:
        return compute(hidden, w13.parts[0], w2.parts[0], topk_ids, topk_weights)
    # On the CPU reading the ids costs nothing, so parts no choice uses are skipped; on a GPU every
    # part runs (its backend skips -1 choices without a host read).
    skip_unused = hidden.device.type == "cpu"
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for a, b, o in zip(w13.parts, w2.parts, w13.offsets):
        local = topk_ids - o
        mine = (topk_ids >= o) & (local < a.shape[0])
        if skip_unused and not bool(mine.any()):
            continue
        out += compute(hidden, a, b, torch.where(mine, local, -1), topk_weights).float()
    return out.to(hidden.dtype)


def group_by_width(widths: Sequence[Width]) -> tuple[list[tuple[Width, list[int]]], list[int]]:
    """A layer's expert widths [E] -> ([(width, expert ids)], widest first, ids ascending, empty
    widths left out; slot_of [E]): the slots of a MixedStack holding each width contiguously."""
    groups = [(w, [e for e, x in enumerate(widths) if x == w]) for w in WIDTHS]
    groups = [(w, ids) for w, ids in groups if ids]
    slot_of = [0] * len(widths)
    for slot, e in enumerate(e for _, ids in groups for e in ids):
        slot_of[e] = slot
    return groups, slot_of


def stack_by_width(w: torch.Tensor, groups: Sequence[tuple[Width, list[int]]], group_size: int,
                   dtype: torch.dtype) -> MixedStack:
    """A layer's full-precision stack w [E, N, K] (the checkpoint's values) as a MixedStack with
    the parts `groups` names: "full" rounded to dtype, 8 and 4 quantized from w itself."""
    parts = []
    for width, ids in groups:
        sel = w[torch.tensor(ids, device=w.device)]
        parts.append(sel.to(dtype) if width == "full" else quantize_experts(sel, width, group_size, dtype))
    return MixedStack(tuple(parts))


def bytes_per_expert(hidden: int, intermediate: int, width: Width, group_size: int, dtype: torch.dtype) -> int:
    """What one expert (w13 [2I, D] and w2 [D, I]) really takes at `width` in a CPU store: the
    stacks the loader would build, made from random weights of those shapes."""
    g = torch.Generator().manual_seed(0)
    total = 0
    for n, k in ((2 * intermediate, hidden), (hidden, intermediate)):
        w = torch.randn(1, n, k, generator=g)
        total += part_nbytes(stack_by_width(w, [(width, [0])], group_size, dtype).parts[0])
    return total
