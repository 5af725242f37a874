"""The one place where device and dtype names are resolved."""
from __future__ import annotations

import torch

from moe_rt.errors import MoeRtError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(name: str | torch.device | None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MoeRtError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeRtError(f"device '{name}' requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise MoeRtError(f"device type '{dev.type}' is not supported (use cpu or cuda)")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise MoeRtError(f"unknown dtype '{name}' (use float32, bfloat16 or float16)")
    return _DTYPES[name]
