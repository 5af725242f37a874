"""Tuning tables for the fused MoE kernels: naming, reading, defaults.

A table is a JSON file in moe_rt/kernels/configs/ named by config_file_name(S, I, device, dtype);
it maps a batch size T (as a string key) to one launch config:
    {"BLOCK_SIZE_M": .., "BLOCK_SIZE_N": .., "BLOCK_SIZE_K": .., "GROUP_SIZE_M": ..,
     "num_warps": .., "num_stages": ..}
Tables are written only by moe_rt.kernels.tune on a real GPU; the tuner and this reader share
config_file_name so the two cannot disagree about where a table lives.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name used in table file names and on the command line."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"fused MoE supports fp32/fp16/bf16, not {dtype}") from None


def device_name(device: torch.device) -> str:
    """Table key for a device: the CUDA marketing name with spaces replaced, else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_file_name(num_slots: int, inter: int, device: str, dtype: str) -> str:
    """The one place that spells a table's file name (S slots, I intermediate size)."""
    return f"E={num_slots},N={inter},device_name={device},dtype={dtype}.json"


def default_config(num_tokens: int, top_k: int, num_slots: int) -> dict:
    """A reasonable launch config when no table exists.

    BLOCK_SIZE_M follows the expected rows per slot (T*K/S): every slot's group is padded to a
    multiple of M, so a tall block on a decode batch spends most of its rows on padding.
    """
    rows_per_slot = num_tokens * top_k / max(num_slots, 1)
    if rows_per_slot <= 16:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                "num_warps": 4, "num_stages": 3}
    if rows_per_slot <= 64:
        return {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                "num_warps": 4, "num_stages": 3}
    return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8,
            "num_warps": 4, "num_stages": 3}


class TuningTables:
    """Reads tables from one directory, caches them, and warns once per missing table.

    Hold one instance per process (e.g. on the expert-compute backend) and pass it to
    fused_experts; the cache and the set of warned keys live here, not in module globals.
    """

    def __init__(self, directory: Path | str = CONFIG_DIR) -> None:
        self.directory = Path(directory)
        self._tables: dict[str, dict[int, dict] | None] = {}

    def table(self, num_slots: int, inter: int, device: str, dtype: str) -> dict[int, dict] | None:
        """The table for a key, or None (with one warning per key) when there is none."""
        name = config_file_name(num_slots, inter, device, dtype)
        if name not in self._tables:
            self._tables[name] = self._read(name)
        return self._tables[name]

    def _read(self, name: str) -> dict[int, dict] | None:
        path = self.directory / name
        if not path.is_file():
            log.warning("no fused-MoE tuning table %s; using default block sizes "
                        "(run python -m moe_rt.kernels.tune on this GPU to make one)", path)
            return None
        raw = json.loads(path.read_text())
        table = {}
        for batch, cfg in raw.items():
            missing = [k for k in CONFIG_KEYS if k not in cfg]
            if missing:
                raise ValueError(f"{path}: entry {batch} lacks {missing}")
            table[int(batch)] = {k: int(cfg[k]) for k in CONFIG_KEYS}
        return table

    def get(self, num_tokens: int, top_k: int, num_slots: int, inter: int, device: str,
            dtype: str) -> dict:
        """The tuned config for the nearest tuned batch size, else default_config."""
        table = self.table(num_slots, inter, device, dtype)
        if not table:
            return default_config(num_tokens, top_k, num_slots)
        nearest = min(table, key=lambda batch: (abs(batch - num_tokens), batch))
        return dict(table[nearest])
