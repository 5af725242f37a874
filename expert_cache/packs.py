"""Flash-aware expert files ("packs"): every expert's weights in one contiguous, 4 KiB-aligned
byte range, so one O_DIRECT read fetches a whole expert.

A checkpoint spreads one expert over three tensors (gate, up, down), often in different places of
a safetensors file; the disk tier then pays three reads per expert, at offsets the page size does
not divide, through the page cache. A pack holds, per MoE layer, one file `layer_LLL.bin` of E
records `[w13 (2I x D) | w2 (D x I) | zero padding to a multiple of 4096 bytes]`, expert e at
e x stride, and `index.json`:

  version, dtype (torch name), layers, experts, w13_shape, w2_shape, expert_bytes, stride,
  files [name], file_bytes [int], fingerprint (of the source checkpoint, `source_fingerprint`),
  format (absent for full-precision packs; for quantized ones `records.ExpertFormat.as_json`:
  bits, group_size, layouts, record_bytes, torch)

A quantized pack (`moe-rt pack-experts --bits 8|4`) holds each expert's record (records.py: the
codes and bf16 scales the CPU kernels take) instead of w13 | w2; `dtype` is then the compute
dtype it was written for and not checked. It is used only by a cache whose expert_bits and group
size it matches, and, because the int4 record is in PyTorch's internal kernel order, only under
the torch version that wrote it (both refused in one line otherwise).

A pack is valid only for the checkpoint it was cut from: `open_pack` refuses one whose index is
unreadable or inconsistent (corrupt), whose files have the wrong size, or whose fingerprint differs
from the checkpoint's (stale). `PackTier` is the disk tier over a pack (expert_cache/slow_tier.py
builds it; docs/expert-cache.md "Packs").

Shape legend: L MoE layers, E experts per layer, I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.policies import ExpertKey
from expert_cache.slow_tier import SlowTier
from moe_rt.errors import MoeRtError

PACK_VERSION = 1
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned (4 KiB covers all)
INDEX = "index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PackError(MoeRtError):
    """A pack that cannot be used: missing, corrupt or stale. The message is one line."""


def source_fingerprint(reader) -> str:
    """Of the checkpoint's safetensors files: name, size, mtime and a hash of the header (tensor
    names, dtypes, shapes, offsets). Rewriting or replacing a file changes it."""
    h = hashlib.sha256()
    for name in sorted(set(reader.weight_map.values())):
        path = Path(reader.dir) / name
        st = path.stat()
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(hashlib.sha256(header).digest())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class PackIndex:
    dtype: torch.dtype
    layers: int  # L
    experts: int  # E
    w13_shape: tuple[int, int]  # (2I, D)
    w2_shape: tuple[int, int]  # (D, I)
    expert_bytes: int  # w13 + w2 bytes of one expert
    stride: int  # bytes from one expert's record to the next (expert_bytes rounded up to ALIGN)
    files: tuple[str, ...]  # per MoE layer
    file_bytes: tuple[int, ...]
    fingerprint: str
    format: dict | None = None  # records.ExpertFormat.as_json() of a quantized pack

    def as_json(self) -> dict:
        dtype = next(k for k, v in _DTYPES.items() if v == self.dtype)
        return {"version": PACK_VERSION, "dtype": dtype, "layers": self.layers,
                "experts": self.experts, "w13_shape": list(self.w13_shape),
                "w2_shape": list(self.w2_shape), "expert_bytes": self.expert_bytes,
                "stride": self.stride, "files": list(self.files),
                "file_bytes": list(self.file_bytes), "fingerprint": self.fingerprint,
                **({} if self.format is None else {"format": self.format})}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "PackIndex":
        try:
            if data["version"] != PACK_VERSION:
                raise PackError(f"{where}: pack version {data['version']}, expected {PACK_VERSION}")
            idx = cls(_DTYPES[data["dtype"]], int(data["layers"]), int(data["experts"]),
                      tuple(data["w13_shape"]), tuple(data["w2_shape"]), int(data["expert_bytes"]),
                      int(data["stride"]), tuple(data["files"]), tuple(data["file_bytes"]),
                      str(data["fingerprint"]), data.get("format"))
            if idx.format is not None:
                want = int(idx.format["record_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise PackError(f"{where}: corrupt pack index ({type(e).__name__}: {e})") from None
        if idx.format is None:
            item = torch.empty((), dtype=idx.dtype).element_size()
            want = (idx.w13_shape[0] * idx.w13_shape[1] + idx.w2_shape[0] * idx.w2_shape[1]) * item
        if (idx.expert_bytes != want or idx.stride % ALIGN or idx.stride < want
                or len(idx.files) != idx.layers or len(idx.file_bytes) != idx.layers
                or any(b != idx.experts * idx.stride for b in idx.file_bytes)):
            raise PackError(f"{where}: corrupt pack index (sizes do not add up)")
        return idx


def _stride(expert_bytes: int) -> int:
    return -(-expert_bytes // ALIGN) * ALIGN


def write_pack(reader, spec, out_dir: str | Path, dtype: torch.dtype | None = None,
               progress: bool = False, fmt=None) -> Path:
    """Cut a pack of the checkpoint's experts into `out_dir` (created; its old pack replaced);
    `dtype` None keeps the checkpoint's. With `fmt` (a records.ExpertFormat) each record is the
    expert quantized from the checkpoint's values. Files are written under temporary names and
    the index last, so an interrupted write leaves no pack that `open_pack` would accept."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # invalid from here until the new index is in place
    L, E = len(spec.moe_layer_ids), spec.num_experts
    D, I = spec.hidden_size, spec.moe.intermediate_size
    if dtype is None:
        dtype = reader.read_expert(spec, 0, 0)[0].dtype
    if dtype not in _DTYPES.values():
        raise PackError(f"packs hold float32, bfloat16 or float16 experts, not {dtype}")
    item = torch.empty((), dtype=dtype).element_size()
    expert_bytes = 3 * D * I * item if fmt is None else fmt.record_bytes
    stride = _stride(expert_bytes)
    fingerprint = source_fingerprint(reader)
    record = torch.zeros(stride, dtype=torch.uint8)
    files = []
    for l in tqdm(range(L), desc="Packing experts", disable=not progress, leave=False):
        name = f"layer_{l:03d}.bin"
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            if fmt is not None:  # a layer at once: quantize_experts over [E, N, K], as the loader does
                pairs = [reader.read_expert(spec, l, e) for e in range(E)]
                arena = fmt.encode(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
                f.write(arena.numpy().tobytes())
            else:
                for e in range(E):
                    w13, w2 = reader.read_expert(spec, l, e)
                    flat = torch.cat([w13.to(dtype).reshape(-1), w2.to(dtype).reshape(-1)])
                    record[:expert_bytes] = flat.view(torch.uint8)
                    f.write(record.numpy().tobytes())
        os.replace(tmp, out / name)
        files.append(name)
    index = PackIndex(dtype, L, E, (2 * I, D), (D, I), expert_bytes, stride, tuple(files),
                      tuple([E * stride] * L), fingerprint, None if fmt is None else fmt.as_json())
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index.as_json(), indent=1))
    os.replace(tmp, out / INDEX)
    return out


def read_index(pack_dir: str | Path) -> PackIndex:
    """The pack's index, checked for consistency and against its files' sizes (PackError)."""
    where = Path(pack_dir) / INDEX
    if not where.is_file():
        raise PackError(f"{pack_dir} holds no expert pack ({INDEX} missing)")
    try:
        data = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackError(f"{where}: corrupt pack index ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise PackError(f"{where}: corrupt pack index (not a JSON object)")
    idx = PackIndex.from_json(data, where)
    for name, size in zip(idx.files, idx.file_bytes):
        path = Path(pack_dir) / name
        if not path.is_file() or path.stat().st_size != size:
            raise PackError(f"{path}: missing or of the wrong size: corrupt pack")
    return idx


def open_pack(pack_dir: str | Path, reader, spec, fmt=None) -> "PackTier":
    """A PackTier over `pack_dir` if it is a sound pack of this checkpoint and model in format
    `fmt` (a records.ExpertFormat; None: full precision), else PackError saying why (corrupt,
    stale, cut for another model, or holding experts of other bits)."""
    idx = read_index(pack_dir)
    if idx.fingerprint != source_fingerprint(reader):
        raise PackError(f"expert pack in {pack_dir} is stale: its checkpoint {reader.dir} changed "
                        f"since it was written")
    D, I = spec.hidden_size, spec.moe.intermediate_size
    if (idx.layers, idx.experts, idx.w13_shape, idx.w2_shape) != (
            len(spec.moe_layer_ids), spec.num_experts, (2 * I, D), (D, I)):
        raise PackError(f"expert pack in {pack_dir} does not match the model's expert shapes")
    _check_format(pack_dir, idx.format, fmt)
    return PackTier(Path(pack_dir), idx)


def _check_format(pack_dir, held: dict | None, fmt) -> None:
    """PackError unless the pack's records are `fmt`'s (same bits, group size, layouts, torch)."""
    name = lambda f: "full-precision" if f is None else (  # noqa: E731
        f"int{f['bits']}" + ("" if f["bits"] == 8 else f" group {f['group_size']}"))
    want = None if fmt is None else fmt.as_json()
    if (held is None) != (want is None) or (held is not None and (
            held["bits"], held["group_size"]) != (want["bits"], want["group_size"])):
        raise PackError(f"expert pack in {pack_dir} holds {name(held)} experts, the config asks for "
                        f"{name(want)} (pack-experts --bits/--group-size)")
    if held is not None and (held.get("torch") != want["torch"] or list(held["layouts"]) != want["layouts"]
                             or held["record_bytes"] != want["record_bytes"]):
        raise PackError(f"expert pack in {pack_dir} was written under torch {held.get('torch')} with "
                        f"record layouts {held['layouts']}; this torch ({want['torch']}) needs {want['layouts']}")


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()).cast("B")


def _read_full(fd: int, views: list[memoryview], offset: int, where: Path) -> None:
    """Fill `views` from the file's bytes at `offset` on (preadv may return short counts)."""
    total, done = sum(len(v) for v in views), 0
    while done < total:
        rest, skip = [], done
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        n = os.preadv(fd, rest, offset + done)
        if n <= 0:
            raise MoeRtError(f"{where}: unexpected end of file reading an expert")
        done += n


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts at an ALIGN boundary, so slots of aligned
    size in it can take O_DIRECT reads without a bounce buffer."""
    n = 1
    for x in shape:
        n *= x
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift: shift + nbytes].view(dtype).view(shape)  # a view keeps `raw` alive


class PackTier(SlowTier):
    """The disk tier over a pack: one aligned read per expert, with O_DIRECT where the file
    system allows it (the page cache is bypassed, so "disk" figures are disk figures); else a
    plain read whose pages are dropped afterwards (posix_fadvise DONTNEED), as DiskTier does.
    The read lands straight in the destination when it is aligned and of the pack's dtype (the
    cache's CPU slots and pinned staging buffers are), else in a per-thread aligned buffer and
    is copied from there."""

    name = "disk"

    def __init__(self, pack_dir: Path, index: PackIndex) -> None:
        self.dir, self.index = pack_dir, index
        self.direct = hasattr(os, "O_DIRECT")
        self._fds = []
        for name in index.files:
            self._fds.append(self._open(pack_dir / name))
        self._local = threading.local()  # one aligned buffer per reading thread

    def _open(self, path: Path) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # e.g. tmpfs: no O_DIRECT
                self.direct = False
        return os.open(path, os.O_RDONLY)

    def _buffer(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = aligned_empty((self.index.stride,), torch.uint8)
        return buf

    def read_into(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor | None) -> None:
        """Full-precision packs: fill w13 [2I, D] and w2 [D, I]. Quantized packs: w13 is the
        destination record (uint8 [stride], a slot of a records arena) and w2 None."""
        l, e = key
        idx = self.index
        fd, offset = self._fds[l], e * idx.stride
        if idx.format is not None:
            record = w13
            if record.data_ptr() % ALIGN == 0 and record.numel() == idx.stride and record.is_contiguous():
                _read_full(fd, [_bytes(record)], offset, self.dir / idx.files[l])  # straight into the slot
            else:
                buf = self._buffer()
                _read_full(fd, [_bytes(buf)], offset, self.dir / idx.files[l])
                record.copy_(buf[: record.numel()])
        elif self._direct_into(w13, idx.w13_shape) and self._direct_into(w2, idx.w2_shape):
            # Straight into the destination (an aligned slot or pinned staging buffer): one
            # read, no copy. w2 follows w13 at an aligned offset because w13's size is aligned.
            _read_full(fd, [_bytes(w13), _bytes(w2)], offset, self.dir / idx.files[l])
        else:
            buf = self._buffer()
            _read_full(fd, [_bytes(buf)], offset, self.dir / idx.files[l])
            flat = buf[: idx.expert_bytes].view(idx.dtype)
            n13 = idx.w13_shape[0] * idx.w13_shape[1]
            # One copy out of the aligned buffer (converts dtype, or moves to the GPU).
            w13.copy_(flat[:n13].view(idx.w13_shape))
            w2.copy_(flat[n13:].view(idx.w2_shape))
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, idx.stride, os.POSIX_FADV_DONTNEED)

    def _direct_into(self, t: torch.Tensor, shape: tuple[int, int]) -> bool:
        """Whether the pack's bytes can be read straight into `t`: a CPU tensor of the pack's
        dtype and shape, contiguous, at an aligned address, of an aligned size (O_DIRECT's
        rules; the plain-read fallback has the same layout)."""
        return (t.device.type == "cpu" and t.dtype == self.index.dtype and tuple(t.shape) == shape
                and t.is_contiguous() and t.data_ptr() % ALIGN == 0
                and t.numel() * t.element_size() % ALIGN == 0)

    def checkpoint_dtype(self) -> torch.dtype:
        return self.index.dtype

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


PACK_CACHE_ENV = "MOE_RT_PACK_CACHE"


def pack_cache_dir(reader, dtype: torch.dtype, fmt=None) -> Path:
    """Where the automatic pack of this checkpoint in `dtype` (or quantized as `fmt`) lives:
    $MOE_RT_PACK_CACHE (tests, other disks) or ~/.cache/moe-rt/packs, then
    <fingerprint>-<dtype> or <fingerprint>-<int8 | int4-gN>."""
    base = os.environ.get(PACK_CACHE_ENV) or os.path.expanduser("~/.cache/moe-rt/packs")
    kind = str(dtype).removeprefix("torch.") if fmt is None else fmt.label()
    return Path(base) / f"{source_fingerprint(reader)}-{kind}"


def disk_tier(reader, spec, dtype: torch.dtype, pack_dir: str | None, *,
              progress: bool = False, fmt=None) -> SlowTier:
    """The disk tier: over `pack_dir` (refused with one line if stale, corrupt or of other bits),
    else over the automatic pack, written (or rewritten, if stale, corrupt or of another format)
    on first use with a one-line notice; if it cannot be written there, over the safetensors
    files as before (quantizing each expert as it is read when `fmt` is given)."""
    import logging

    from expert_cache.slow_tier import checkpoint_tier

    log = logging.getLogger(__name__)
    if pack_dir is not None:
        try:
            return open_pack(pack_dir, reader, spec, fmt)
        except PackError as e:
            raise MoeRtError(f"cache: {e}; rewrite it with moe-rt pack-experts --out {pack_dir}") from None
    folder = pack_cache_dir(reader, dtype, fmt)
    try:
        return open_pack(folder, reader, spec, fmt)
    except PackError:
        pass
    log.warning("cache: writing an expert pack of %s to %s (once; one aligned read per expert)",
                reader.dir, folder)
    try:
        write_pack(reader, spec, folder, dtype, progress=progress, fmt=fmt)
        return open_pack(folder, reader, spec, fmt)
    except (OSError, PackError) as e:
        log.warning("cache: cannot use an expert pack in %s (%s); reading the checkpoint files",
                    folder, e)
        return checkpoint_tier(reader, spec, fmt)
