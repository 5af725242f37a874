"""Slow tiers of quantized experts: each read fills one record slot (records.py) whole.

`RecordHostTier` (offload: cpu) quantizes every expert once at start-up, from the checkpoint's
values as the all-resident loader does, and keeps one records arena [E, stride] per MoE layer in
host RAM; a read copies one record. `QuantizingTier` is the disk tier without a pack: it reads the
expert's full-precision tensors from the safetensors files and quantizes them into the slot on
every read (correct, slower; a quantized pack, packs.py, reads the record itself). A quantized
pack's tier is packs.PackTier. Their `read_into(key, record, None)` takes the slot's bytes.

Shape legend: L MoE layers, E experts per layer, I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import torch

from expert_cache.policies import ExpertKey
from expert_cache.records import ExpertFormat
from expert_cache.slow_tier import DiskTier, SlowTier
from moe_rt.quant.experts import QuantizedStack


class RecordHostTier(SlowTier):
    """Every expert's record in host RAM, per layer a records arena [E, stride]."""

    name = "cpu"

    def __init__(self, reader, spec, fmt: ExpertFormat, *, progress: bool = False) -> None:
        from tqdm import tqdm

        self.fmt = fmt
        L, E = len(spec.moe_layer_ids), spec.num_experts
        self.arenas: list[torch.Tensor] = []
        self._stacks: list[tuple[QuantizedStack, QuantizedStack]] = []
        for l in tqdm(range(L), desc="Quantizing experts to host RAM", disable=not progress, leave=False):
            pairs = [reader.read_expert(spec, l, e) for e in range(E)]
            arena = fmt.encode(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
            self.arenas.append(arena)
            self._stacks.append(fmt.stacks(arena))

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor | None = None) -> None:
        l, e = key
        w13.copy_(self.arenas[l][e])  # w13: the destination record; one copy of its bytes

    def host_layer(self, layer: int) -> tuple[QuantizedStack, QuantizedStack]:
        """The layer's quantized stacks [E, ...] by logical id (host compute of misses)."""
        return self._stacks[layer]


class QuantizingTier(SlowTier):
    """The disk tier over the checkpoint's files for quantized experts: read, then quantize."""

    name = "disk"

    def __init__(self, inner: DiskTier, fmt: ExpertFormat) -> None:
        self.inner, self.fmt = inner, fmt
        self._dtype = inner.checkpoint_dtype()  # the checkpoint's values, unrounded, as the loader reads

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor | None = None) -> None:
        a = torch.empty(self.fmt.w13_shape, dtype=self._dtype)
        b = torch.empty(self.fmt.w2_shape, dtype=self._dtype)
        self.inner.read_into(key, a, b)
        self.fmt.encode(a[None], b[None], out=w13[None])

    def close(self) -> None:
        self.inner.close()


class PlanHostTier(SlowTier):
    """offload cpu under a bits plan (widths.py): each expert once in host RAM at its own width,
    full-width ones as tensors in the compute dtype, quantized ones as records (one arena per
    layer and width), made from the checkpoint's values as the all-resident loader makes them."""

    name = "cpu"

    def __init__(self, reader, spec, wp, dtype: torch.dtype, *, progress: bool = False) -> None:
        from tqdm import tqdm

        self._dense: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._records: dict[ExpertKey, torch.Tensor] = {}  # a row [stride] of its layer's arena
        for l in tqdm(range(len(wp.widths)), desc="Experts to host RAM", disable=not progress, leave=False):
            for width in {w: None for w in wp.widths[l]}:
                ids = wp.experts_of(l, width)
                pairs = [reader.read_expert(spec, l, e) for e in ids]
                if width == "full":
                    for e, (a, b) in zip(ids, pairs):
                        self._dense[(l, e)] = (a.to(dtype), b.to(dtype))
                    continue
                arena = wp.fmt(width).encode(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
                for i, e in enumerate(ids):
                    self._records[(l, e)] = arena[i]

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor | None = None) -> None:
        record = self._records.get(key)
        if record is not None:
            w13.copy_(record)  # w13: the destination record
            return
        a, b = self._dense[key]
        w13.copy_(a)
        w2.copy_(b)


class PlanDiskTier(SlowTier):
    """offload disk under a bits plan: full-width experts read from the safetensors files as
    DiskTier reads them, quantized ones read the same way and quantized into their record."""

    name = "disk"

    def __init__(self, inner: DiskTier, wp) -> None:
        self.inner, self.wp = inner, wp
        self._quantizing = {w: QuantizingTier(inner, fmt) for w, fmt in wp.formats.items()}

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor | None = None) -> None:
        width = self.wp.width(key)
        (self.inner if width == "full" else self._quantizing[width]).read_into(key, w13, w2)

    def close(self) -> None:
        self.inner.close()
