"""The slow tier: where non-resident experts live, and the one way their bytes are read.

`HostTier` (offload: cpu) holds every expert of every MoE layer in host RAM, stacked per layer, in
the compute dtype; page-locked ("pinned") when the fast tier is a GPU, so copies to it can be
asynchronous. Pinning registers the tensor's own pages (cudaHostRegister) rather than allocating
through torch's pinned allocator, which rounds every block up to a power of two (Mixtral's
84 GiB of experts would take 96 GiB of locked memory). `DiskTier` (offload: disk) keeps nothing: each read goes from the checkpoint's
safetensors file straight into the destination (a fast-tier slot, or a staging buffer when the
checkpoint dtype differs from the compute dtype or the destination is on a GPU).

Disk reads use `os.preadv` at the tensor's byte offset (parsed from the safetensors header) rather
than the reader's mmap: positional reads are thread-safe, release the GIL, and leave no mapping
behind, so after each read we can `posix_fadvise(DONTNEED)` the range. Without that the kernel's
page cache silently keeps recently read experts in RAM and becomes a hidden second tier: "disk"
figures would then really be RAM figures. `drop_page_cache=False` keeps the page cache (faster on
repeated reads, and what a plain mmap loader gets); the offload benchmark reports both.

Shape legend: E experts per layer, I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import json
import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.policies import ExpertKey
from moe_rt.errors import MoeRtError

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class SlowTier(ABC):
    """Read one expert's weights into caller-owned tensors. Safe to call from a worker thread."""

    name: str  # "cpu" or "disk": the key of CacheStats.bytes_moved

    @abstractmethod
    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [2I, D] and w2 [D, I] (any device, compute dtype) with expert `key`. Tiers
        of quantized experts (record_tiers.py, a quantized pack) take the slot's record bytes
        (uint8 [stride]) as w13 and None as w2."""

    def host_weights(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13, w2) already in host RAM (for computing the expert on the CPU), or None."""
        return None

    def host_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13 [E, 2I, D], w2 [E, D, I]) of a whole MoE layer in host RAM, indexed by logical
        expert id (for running experts on the host without copying them), or None."""
        return None

    def close(self) -> None:
        pass


class HostTier(SlowTier):
    """Every expert in (pinned, when CUDA is available) host memory."""

    name = "cpu"

    def __init__(self, reader, spec, dtype: torch.dtype, *, pin: bool = False,
                 progress: bool = False) -> None:
        """pin: page-lock the stacks (only useful, and only done, when the fast tier is a GPU)."""
        from tqdm import tqdm

        self._registered: list[torch.Tensor] = []
        L, E = len(spec.moe_layer_ids), spec.num_experts
        D, I = spec.hidden_size, spec.moe.intermediate_size
        self.w13: list[torch.Tensor] = []  # per layer [E, 2I, D]
        self.w2: list[torch.Tensor] = []  # per layer [E, D, I]
        for l in tqdm(range(L), desc="Experts to host RAM", disable=not progress, leave=False):
            w13 = self._host(torch.empty(E, 2 * I, D, dtype=dtype), pin)
            w2 = self._host(torch.empty(E, D, I, dtype=dtype), pin)
            for e in range(E):
                a, b = reader.read_expert(spec, l, e)
                w13[e].copy_(a)
                w2[e].copy_(b)
            self.w13.append(w13)
            self.w2.append(w2)

    def _host(self, t: torch.Tensor, pin: bool) -> torch.Tensor:
        """`t` page-locked in place (exactly its bytes), or torch's pinned copy if registering fails."""
        if not pin or not torch.cuda.is_available():
            return t
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(rc) != 0:
            return t.pin_memory()
        self._registered.append(t)
        return t

    def close(self) -> None:
        for t in self._registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self._registered = []

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> None:
        l, e = key
        # non_blocking only matters host -> GPU from pinned memory; the caller orders it (stream).
        w13.copy_(self.w13[l][e], non_blocking=w13.is_cuda)
        w2.copy_(self.w2[l][e], non_blocking=w2.is_cuda)

    def host_weights(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        l, e = key
        return self.w13[l][e], self.w2[l][e]

    def host_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13[layer], self.w2[layer]


@dataclass(frozen=True)
class _Piece:
    """One contiguous byte range of a file that fills rows [row0, row0+rows) of w13 or of w2."""

    file: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    target: str  # "w13" or "w2"
    row0: int
    rows: int


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MoeRtError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            return json.loads(f.read(n)), 8 + n
        except json.JSONDecodeError:
            raise MoeRtError(f"{path} has an unreadable safetensors header") from None


class DiskTier(SlowTier):
    """Experts read lazily from the checkpoint's safetensors files; no copy kept in RAM."""

    name = "disk"

    def __init__(self, reader, spec, *, drop_page_cache: bool = True) -> None:
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.spec = spec
        D, I = spec.hidden_size, spec.moe.intermediate_size
        headers = {f: _safetensors_header(reader.dir / f) for f in set(reader.weight_map.values())}
        self._fds = {f: os.open(reader.dir / f, os.O_RDONLY) for f in headers}
        E = spec.num_experts
        self._pieces: dict[ExpertKey, tuple[_Piece, ...]] = {}
        for l, layer_id in enumerate(spec.moe_layer_ids):
            base = f"model.layers.{layer_id}.{spec.moe_weight_prefix}.experts"
            fused = f"{base}.gate_up_proj" in reader.weight_map
            for e in range(E):
                if fused:  # [E, 2I, D] / [E, D, I] stacks: expert e is one contiguous slice
                    parts = [(f"{base}.gate_up_proj", "w13", 0, 2 * I, (E, 2 * I, D), e),
                             (f"{base}.down_proj", "w2", 0, D, (E, D, I), e)]
                else:
                    g, u, d = spec.expert_names
                    parts = [(f"{base}.{e}.{g}.weight", "w13", 0, I, (I, D), None),
                             (f"{base}.{e}.{u}.weight", "w13", I, I, (I, D), None),
                             (f"{base}.{e}.{d}.weight", "w2", 0, D, (D, I), None)]
                self._pieces[(l, e)] = tuple(self._piece(reader, headers, *p) for p in parts)

    @staticmethod
    def _piece(reader, headers, name, target, row0, rows, shape, index) -> _Piece:
        if name not in reader.weight_map:
            raise MoeRtError(f"tensor '{name}' is missing from the checkpoint in {reader.dir}")
        file = reader.weight_map[name]
        header, data_start = headers[file]
        info = header.get(name)
        if info is None or tuple(info["shape"]) != shape or info["dtype"] not in _ST_DTYPES:
            raise MoeRtError(f"tensor '{name}' in {file}: expected shape {shape} in F32/BF16/F16, "
                             f"got {info and (info['shape'], info['dtype'])}")
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        offset = data_start + begin
        nbytes = end - begin
        if index is not None:  # one expert of a stacked tensor
            nbytes //= shape[0]
            offset += index * nbytes
        return _Piece(file, offset, nbytes, dtype, target, row0, rows)

    def checkpoint_dtype(self) -> torch.dtype:
        return next(iter(self._pieces.values()))[0].dtype

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> None:
        for p in self._pieces[key]:
            dst = (w13 if p.target == "w13" else w2)[p.row0: p.row0 + p.rows]
            if dst.device.type == "cpu" and dst.dtype == p.dtype and dst.is_contiguous():
                self._pread(p, dst)  # straight into the slot: no intermediate copy
            else:
                tmp = torch.empty(dst.shape, dtype=p.dtype)
                self._pread(p, tmp)
                dst.copy_(tmp)  # converts dtype / moves to the GPU

    def _pread(self, p: _Piece, dst: torch.Tensor) -> None:
        buf = memoryview(dst.view(torch.uint8).numpy()).cast("B")
        if len(buf) != p.nbytes:
            raise MoeRtError(f"{p.file}: expert piece is {p.nbytes} bytes, destination {len(buf)}")
        fd, done = self._fds[p.file], 0
        while done < p.nbytes:  # preadv may return short counts
            n = os.preadv(fd, [buf[done:]], p.offset + done)
            if n <= 0:
                raise MoeRtError(f"{p.file}: unexpected end of file while reading an expert")
            done += n
        if self.drop_page_cache:
            os.posix_fadvise(fd, p.offset, p.nbytes, os.POSIX_FADV_DONTNEED)

    def drop_all(self) -> None:
        """Drop every checkpoint page from the page cache (a cold start for measurements)."""
        if hasattr(os, "posix_fadvise"):
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def checkpoint_tier(reader, spec, fmt=None) -> SlowTier:
    """The disk tier over the safetensors files; with `fmt` (records.ExpertFormat) each expert
    is quantized into its record as it is read (correct, slower than a quantized pack)."""
    if fmt is None:
        return DiskTier(reader, spec)
    from expert_cache.record_tiers import QuantizingTier

    return QuantizingTier(DiskTier(reader, spec), fmt)


def build_slow_tier(offload: str, reader, spec, dtype: torch.dtype, *,
                    progress: bool = False, cfg=None, pin: bool = False, fmt=None) -> SlowTier:
    """The tier for `offload`; for disk, over an expert pack when cfg (a CacheConfig) names one
    or allows the automatic one (packs.disk_tier), else over the safetensors files. pin: the host
    tier is page-locked (when the fast tier is a GPU). fmt: quantized experts' record format
    (records.py); the tier then reads whole records into record slots."""
    if offload == "cpu":
        if fmt is not None:
            from expert_cache.record_tiers import RecordHostTier

            return RecordHostTier(reader, spec, fmt, progress=progress)
        return HostTier(reader, spec, dtype, pin=pin, progress=progress)
    if offload == "disk":
        if cfg is not None and (cfg.pack_dir is not None or cfg.auto_pack):
            from expert_cache.packs import disk_tier

            return disk_tier(reader, spec, dtype, cfg.pack_dir, progress=progress, fmt=fmt)
        return checkpoint_tier(reader, spec, fmt)
    raise MoeRtError(f"cache: offload {offload!r} has no slow tier (use cpu or disk)")
