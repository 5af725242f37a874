"""The one place where device and dtype names are resolved."""
from __future__ import annotations

import contextlib

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
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        # checked here, before any load: torch would only fail at the first allocation on it
        raise MoeRtError(f"device '{name}' does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
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


def launch_device(t: torch.Tensor):
    """Context making t's CUDA device the thread's current one (a no-op for other devices).

    Triton launches on the calling thread's current device and stream, not on its arguments':
    without this a kernel for cuda:1 tensors runs on cuda:0, as does one launched from a thread
    that never chose a device (the server's engine thread). Cheap: a device swap, no sync.
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
