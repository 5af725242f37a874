"""Weight-only quantized expert stacks (int8, int4), made from full-precision weights at load.

Shape legend: S slots, N output rows, K input columns of one expert matrix (w13: N = 2I, K = D;
w2: N = D, K = I), G = K // group_size groups of input columns per row.

Formats (docs/quantization.md):
    int8  symmetric, one scale per output row:      w[n, k] = q[n, k] * scale[n]
          q int8 [S, N, K] in -127..127, scales [S, N, 1]
    int4  asymmetric, one scale and zero per group of group_size input columns:
                                                    w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]
          q in 0..15 packed two per byte, uint8 [S, N, K/2] (column 2j in the low nibble, 2j+1 in
          the high one), scales and zeros [S, N, G]. This is the convention of PyTorch's int4 CPU
          kernel (zero = min + 8 * scale), so the same numbers feed it, the Triton kernel and the
          reference dequantisation.
Scales and zeros are bfloat16 values (held in float32 here): the CPU kernels take bfloat16, so
every path computes with the same numbers (and an expert cache stores only the bfloat16 ones).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moe_rt.errors import MoeRtError


@dataclass(frozen=True)
class CpuLowBit:
    """The operands PyTorch's low-bit CPU matmuls take (made once at load, on CPU only).

    int8: qweight is QuantizedStack.qweight itself, scales [S, N] in bfloat16.
    int4: qweight [S, N, K/2] uint8 in the layout of torch._convert_weight_to_int4pack_for_cpu
          (not the plain nibble order), scales [S, G, N, 2] bfloat16: (scale, zero) pairs.
    """
    qweight: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class QuantizedStack:
    """A stack of S expert matrices [S, N, K] stored in 8 or 4 bits; stands in for a weight tensor
    of `dtype` (the compute dtype) in LayerExperts and the expert-compute backends."""
    bits: int  # 8 or 4
    group_size: int  # input columns per scale (K for int8)
    codes: torch.Tensor  # int8 [S, N, K] | uint8 [S, N, K/2] in `layout`
    scales: torch.Tensor  # float32 [S, N, G]
    zeros: torch.Tensor | None  # float32 [S, N, G] (int4) | None (int8)
    dtype: torch.dtype  # compute dtype the dequantised weights take
    cpu: CpuLowBit | None = None
    # "plain": the nibble order of the module docstring. "cpu_int4": int4 codes held only in the
    # order of PyTorch's CPU kernel (cpu.qweight is this same tensor), read back by _unpack_cpu_int4.
    layout: str = "plain"

    @property
    def qweight(self) -> torch.Tensor:
        """The codes in the plain layout (computed from the kernel's order when only that is held)."""
        if self.layout == "plain":
            return self.codes
        q = _unpack_cpu_int4(self.codes)
        return q[..., 0::2] | (q[..., 1::2] << 4)

    @property
    def shape(self) -> torch.Size:
        S, N, k = self.codes.shape
        return torch.Size((S, N, k * 2 if self.bits == 4 else k))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, slot: int | None = None) -> torch.Tensor:
        """Weights [S, N, K] (or [N, K] of one slot) in self.dtype: the obviously-right reading."""
        pick = (lambda t: t) if slot is None else (lambda t: t[slot])
        q, scales = pick(self.codes), pick(self.scales)
        if self.bits == 8:
            return (q.float() * scales).to(self.dtype)
        if self.layout == "cpu_int4":
            q = _unpack_cpu_int4(q)  # [..., N, K]
        else:
            q = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)  # [..., N, K], column order restored
        g = self.group_size
        qg = q.unflatten(-1, (q.shape[-1] // g, g)).float()  # [..., N, G, g]
        w = (qg - 8) * scales[..., None] + pick(self.zeros)[..., None]
        return w.flatten(-2).to(self.dtype)

    def nbytes(self) -> int:
        """Bytes held, the CPU kernels' own copies included (int8 shares its codes with them)."""
        parts = [self.codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        if self.cpu is not None:
            parts += [self.cpu.scales] + ([self.cpu.qweight] if self.cpu.qweight is not self.codes else [])
        return sum(t.numel() * t.element_size() for t in parts)


def quantize(w: torch.Tensor, bits: int, group_size: int = 64, dtype: torch.dtype | None = None) -> QuantizedStack:
    """w [S, N, K] (any float dtype) -> QuantizedStack standing in for `dtype` (default w.dtype).

    int8 rounds w / scale to nearest with scale = max|w[n]| / 127; int4 maps each group's
    [min, max] onto 0..15 (scale = (max - min) / 15) and rounds to nearest. Scales and zeros are
    rounded to bfloat16 values first and the codes chosen against the rounded ones.
    """
    wf = w.float()
    dtype = dtype or w.dtype
    S, N, K = wf.shape
    if bits == 8:
        scales = _bf16((wf.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12))
        q = torch.round(wf / scales).clamp(-127, 127).to(torch.int8)
        return QuantizedStack(8, K, q.contiguous(), scales.contiguous(), None, dtype)
    if bits != 4:
        raise MoeRtError(f"expert_bits must be 8 or 4, got {bits}")
    if K % 2 or K % group_size:
        raise MoeRtError(f"expert_group_size {group_size} does not divide the input size {K} of an expert "
                         f"matrix; choose 32, 64 or 128 dividing the hidden and intermediate sizes")
    wg = wf.unflatten(-1, (K // group_size, group_size))  # [S, N, G, g]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = _bf16(((hi - lo) / 15).clamp(min=1e-12))
    zeros = _bf16(lo + 8 * scales)
    q = torch.round((wg - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.uint8).flatten(-2)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedStack(4, group_size, packed.contiguous(), scales.contiguous(), zeros.contiguous(), dtype)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest bfloat16 values, kept in float32. Scales and zeros are chosen so,
    because the CPU kernels take them in bfloat16: every path (kernel, dequantisation, an expert
    cache's bf16-only records) then computes with the same numbers, so their outputs agree."""
    return x.to(torch.bfloat16).float()


def with_cpu_operands(stack: QuantizedStack) -> QuantizedStack:
    """The stack plus the operands of PyTorch's low-bit CPU kernels (CPU tensors only). The
    int4 ones take only N divisible by 16 and groups of 32..256; other stacks stay without them
    (the dequantising path)."""
    if stack.bits == 4 and (stack.shape[1] % 16 or stack.group_size not in (32, 64, 128, 256)):
        return stack
    if stack.bits == 8:
        cpu = CpuLowBit(stack.codes, stack.scales[..., 0].to(torch.bfloat16).contiguous())
        return replace(stack, cpu=cpu)
    q = torch.stack([stack.codes & 15, stack.codes >> 4], dim=-1).flatten(-2)  # [S, N, K] plain
    packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(q[s].to(torch.int32), 1)
                          for s in range(q.shape[0])])
    sz = torch.stack([stack.scales, stack.zeros], dim=-1).transpose(1, 2)  # [S, G, N, 2]
    cpu = CpuLowBit(packed, sz.to(torch.bfloat16).contiguous())
    # Keep one copy of the codes when the kernel's order is the one _unpack_cpu_int4 reads; it is
    # PyTorch's internal layout, so it is checked here on these very codes, and both are kept if not.
    if stack.shape[1] % 64 == 0 and torch.equal(_unpack_cpu_int4(packed), q):
        return replace(stack, codes=packed, cpu=cpu, layout="cpu_int4")
    return replace(stack, cpu=cpu)


def _unpack_cpu_int4(p: torch.Tensor) -> torch.Tensor:
    """Codes [..., N, K] (uint8 0..15) from torch._convert_weight_to_int4pack_for_cpu's output
    [..., N, K/2] (PyTorch 2.x, N a multiple of 64): per block of 64 rows and per input column k,
    32 bytes whose low nibbles hold rows 0..31 and high nibbles rows 32..63 of the block."""
    *lead, N, half = p.shape
    b = p.reshape(*lead, N // 64, 2 * half, 32)
    rows = torch.cat([b & 15, b >> 4], dim=-1)  # [..., N/64, K, 64]
    return rows.transpose(-1, -2).reshape(*lead, N, 2 * half)


def quantize_experts(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None) -> QuantizedStack:
    """quantize() on w's device, with the CPU kernels' operands when w lives on the CPU."""
    stack = quantize(w, bits, group_size, dtype)
    return with_cpu_operands(stack) if stack.device.type == "cpu" else stack


def as_dense(w: torch.Tensor | QuantizedStack) -> torch.Tensor:
    """A weight stack as a plain tensor: quantized stacks are dequantised (slow paths only)."""
    return w.dequantize() if isinstance(w, QuantizedStack) else w
