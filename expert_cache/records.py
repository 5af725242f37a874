"""Expert records: the bytes of one expert in the form the cache stores, moves and computes from.

A record is the minimal set of tensors the compute path needs for one expert, laid end to end
(each part at a 64-byte offset). An `ExpertFormat` describes it; a slot pool is one page-aligned
byte arena [S, stride] (stride = the record rounded up to 4 KiB) whose QuantizedStacks are views
into it, so copying a record (host tier) or one O_DIRECT read of a pack record (disk tier) fills a
slot with nothing to convert, and the existing quantized compute (compute_quant.py) runs on the
pool as it does on an all-resident stack.

Parts per matrix (N output rows, K input columns, G = K / group_size; w13 then w2):
    int8        codes int8 [N, K], scales bf16 [N]               (torch._weight_int8pack_mm's operands)
    int4_cpu    codes uint8 [N, K/2] in PyTorch's CPU int4-pack order, sz bf16 [G, N, 2] (scale, zero)
                (torch._weight_int4pack_mm_for_cpu's operands; the dequantising path reads the same)
    int4_both   plain codes uint8 [N, K/2], kernel-order codes [N, K/2], sz [G, N, 2]
                (N a multiple of 16 but not of 64: the plain codes cannot be read from the kernel's)
    int4_plain  plain codes uint8 [N, K/2], sz [G, N, 2] (no CPU kernel for this shape: dequantised)
The scales are bf16 values from quantize() on (moe_rt/quant/experts.py), so a record holds exactly
what the all-resident quantized model computes with: cached and resident logits are equal bit for
bit. Full-precision ("dense") experts keep their own w13/w2 slot tensors (cache.py); this format
object exists per pool, so pools of different widths can live side by side.

The int4 kernel order is PyTorch's internal layout: `layout_check()` names the torch version that
produced it, and packs written under another version are refused (packs.py).

Shape legend: S slots (or E experts of a layer), N, K as above.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expert_cache.packs import ALIGN, aligned_empty
from moe_rt.errors import MoeRtError
from moe_rt.quant.experts import CpuLowBit, QuantizedStack, quantize_experts

_PART_ALIGN = 64  # offset of each part inside a record (vector loads; bf16 views need 2)


@dataclass(frozen=True)
class Part:
    name: str  # "w13.codes", "w13.cpu_codes", "w13.scales" (int8), "w13.sz" (int4)
    dtype: torch.dtype
    shape: tuple[int, ...]  # of one expert
    offset: int  # bytes from the record's start

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for x in self.shape:
            n *= x
        return n


def _matrix_layout(bits: int, group_size: int, shape: tuple[int, int]) -> str:
    """Which record parts a quantized [N, K] matrix needs on the CPU: what with_cpu_operands makes
    of it (probed on random codes: the kernel-order check is on the codes themselves)."""
    if bits == 8:
        return "int8"
    probe = quantize_experts(torch.randn(1, *shape), 4, group_size)
    if probe.layout == "cpu_int4":
        return "int4_cpu"
    return "int4_both" if probe.cpu is not None else "int4_plain"


def _parts(prefix: str, layout: str, N: int, K: int, group_size: int, at: int) -> list[Part]:
    if layout == "int8":
        specs = [("codes", torch.int8, (N, K)), ("scales", torch.bfloat16, (N,))]
    else:
        sz = ("sz", torch.bfloat16, (K // group_size, N, 2))
        codes = [("codes", torch.uint8, (N, K // 2))]
        if layout == "int4_both":
            codes.append(("cpu_codes", torch.uint8, (N, K // 2)))
        specs = [*codes, sz]
    out = []
    for name, dtype, shape in specs:
        p = Part(f"{prefix}.{name}", dtype, shape, at)
        out.append(p)
        at = -(-(at + p.nbytes) // _PART_ALIGN) * _PART_ALIGN
    return out


@dataclass(frozen=True)
class ExpertFormat:
    """How one quantized expert is stored: bits, group size and per-matrix layout (int8,
    int4_cpu, int4_both, int4_plain), for experts of w13 [2I, D] and w2 [D, I]."""

    bits: int  # 8 or 4
    group_size: int  # input columns per scale (int4)
    dtype: torch.dtype  # compute dtype the stacks stand in for
    w13_shape: tuple[int, int]  # (2I, D)
    w2_shape: tuple[int, int]  # (D, I)
    layouts: tuple[str, str]  # of w13, of w2
    parts: tuple[Part, ...] = field(init=False)

    def __post_init__(self) -> None:
        p13 = _parts("w13", self.layouts[0], *self.w13_shape, self.group_size, 0)
        end = -(-(p13[-1].offset + p13[-1].nbytes) // _PART_ALIGN) * _PART_ALIGN
        object.__setattr__(self, "parts", tuple(p13 + _parts("w2", self.layouts[1], *self.w2_shape,
                                                                 self.group_size, end)))

    @property
    def record_bytes(self) -> int:
        """Bytes of one expert's record: what a load moves and a slot holds (before padding)."""
        last = self.parts[-1]
        return last.offset + last.nbytes

    @property
    def stride(self) -> int:
        """Bytes from one slot (or pack record) to the next: record_bytes rounded up to 4 KiB."""
        return -(-self.record_bytes // ALIGN) * ALIGN

    def label(self) -> str:
        return f"int{self.bits}" + ("" if self.bits == 8 else f"-g{self.group_size}")

    # -- arenas ---------------------------------------------------------------------------------
    def arena(self, S: int) -> torch.Tensor:
        """An uninitialised page-aligned uint8 [S, stride]: S records."""
        return aligned_empty((S, self.stride), torch.uint8)

    def views(self, arena: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part of every record in `arena` [S, stride] as a tensor [S, *part.shape] (views)."""
        S = arena.shape[0]
        return {p.name: arena[:, p.offset: p.offset + p.nbytes].view(p.dtype).view(S, *p.shape)
                for p in self.parts}

    def stacks(self, arena: torch.Tensor) -> tuple[QuantizedStack, QuantizedStack]:
        """(w13, w2) QuantizedStacks over the records in `arena` (views: writing a record's bytes
        changes the expert its slot holds)."""
        v = self.views(arena)
        return (self._stack(v, "w13", self.layouts[0], self.w13_shape[1]),
                self._stack(v, "w2", self.layouts[1], self.w2_shape[1]))

    def _stack(self, v: dict, m: str, layout: str, K: int) -> QuantizedStack:
        if layout == "int8":
            codes, scales = v[f"{m}.codes"], v[f"{m}.scales"]
            return QuantizedStack(8, K, codes, scales[..., None], None, self.dtype, CpuLowBit(codes, scales))
        codes, sz = v[f"{m}.codes"], v[f"{m}.sz"]
        scales, zeros = sz[..., 0].transpose(1, 2), sz[..., 1].transpose(1, 2)  # [S, N, G] views
        g = self.group_size
        if layout == "int4_cpu":
            return QuantizedStack(4, g, codes, scales, zeros, self.dtype, CpuLowBit(codes, sz), "cpu_int4")
        cpu = CpuLowBit(v[f"{m}.cpu_codes"], sz) if layout == "int4_both" else None
        return QuantizedStack(4, g, codes, scales, zeros, self.dtype, cpu, "plain")

    def encode(self, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Records [E, stride] of experts w13 [E, 2I, D], w2 [E, D, I] (full precision, e.g. the
        checkpoint's values), quantized exactly as the all-resident loader quantizes them
        (quantize_experts on the same values: per-row arithmetic, so batching does not matter).
        Padding bytes are zero."""
        E = w13.shape[0]
        arena = self.arena(E) if out is None else out
        arena.zero_()
        v = self.views(arena)
        for m, w, layout in (("w13", w13, self.layouts[0]), ("w2", w2, self.layouts[1])):
            q = quantize_experts(w.cpu(), self.bits, self.group_size, self.dtype)
            want = {"int4_cpu": "cpu_int4"}.get(layout, "plain")
            if q.layout != want or (q.cpu is None) != (layout == "int4_plain"):
                raise MoeRtError(f"expert {m} quantized to layout {q.layout}, the format says {layout}")
            v[f"{m}.codes"].copy_(q.codes)
            if layout == "int8":
                v[f"{m}.scales"].copy_(q.cpu.scales)
            elif layout == "int4_plain":
                v[f"{m}.sz"].copy_(torch.stack([q.scales, q.zeros], dim=-1).transpose(1, 2))
            else:
                v[f"{m}.sz"].copy_(q.cpu.scales)
                if layout == "int4_both":
                    v[f"{m}.cpu_codes"].copy_(q.cpu.qweight)
        return arena

    # -- identity (pack index) --------------------------------------------------------------------
    def as_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "layouts": list(self.layouts),
                "record_bytes": self.record_bytes, "torch": layout_check()}


def layout_check() -> str:
    """What makes a kernel-order (int4_cpu) record valid: the torch version that wrote it."""
    return torch.__version__.split("+")[0]


def expert_format(spec, bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> ExpertFormat:
    """The record format of `spec`'s experts at `bits` on `device` (CPU only: a GPU fast tier
    would need the Triton kernel's operands, which no record holds yet)."""
    if torch.device(device).type != "cpu":
        raise MoeRtError("cache: expert_bits with an offloading cache runs on a CPU fast tier only "
                         "(device cpu); keep the experts resident on the GPU or drop expert_bits")
    if bits not in (8, 4):
        raise MoeRtError(f"expert_bits must be 8 or 4, got {bits}")
    D, I = spec.hidden_size, spec.moe.intermediate_size
    s13, s2 = (2 * I, D), (D, I)
    if bits == 4 and (D % group_size or I % group_size):
        raise MoeRtError(f"expert_group_size {group_size} does not divide the hidden size {D} and the "
                         f"intermediate size {I}; choose 32, 64 or 128 dividing both")
    layouts = (_matrix_layout(bits, group_size, s13), _matrix_layout(bits, group_size, s2))
    return ExpertFormat(bits, group_size if bits == 4 else 0, dtype, s13, s2, layouts)
