"""How many bytes the paged KV cache gets.

An explicit `kv_cache_memory_gb` is taken as given. Without one, a CPU engine takes 1 GiB (host
memory is shared with everything else on the machine, and a CPU decodes few sequences at once), or
less when that is more than the engine could ever fill (`max_num_seqs` sequences of the full
context: a small model would otherwise hold a gigabyte of cache it never touches), and a
CUDA engine takes what `gpu_memory_utilization` of the device leaves once the model's weights are
loaded and the bytes the assembly reserves (an expert cache's slots) are set aside, as vLLM sizes
its cache: the KV cache, not a fixed guess, grows with the GPU.
"""
from __future__ import annotations

import torch

from moe_rt.config import EngineConfig
from moe_rt.errors import MoeRtError

GIB = 2**30
CPU_DEFAULT_BYTES = 1 * GIB


def kv_cache_bytes(engine: EngineConfig, device: torch.device, reserve_bytes: int = 0,
                   most_bytes: int | None = None) -> int:
    """most_bytes: what the engine could ever use (every running sequence at the full context);
    caps the CPU default only."""
    if engine.kv_cache_memory_gb is not None:
        return int(engine.kv_cache_memory_gb * GIB)
    if device.type != "cuda":
        return CPU_DEFAULT_BYTES if most_bytes is None else min(CPU_DEFAULT_BYTES, most_bytes)
    free, total = torch.cuda.mem_get_info(device)
    return gpu_budget(total, total - free, reserve_bytes, engine.gpu_memory_utilization)


def gpu_budget(total: int, used: int, reserve_bytes: int, utilization: float) -> int:
    """Bytes left for the KV cache: utilization x total, minus what is in use (weights, and
    anything else on the device) and what is reserved for parts installed later."""
    budget = int(utilization * total) - used - reserve_bytes
    if budget <= 0:
        raise MoeRtError(
            f"no GPU memory is left for the KV cache: {used / GIB:.2f} GiB in use and {reserve_bytes / GIB:.2f} GiB "
            f"reserved of {utilization:.0%} x {total / GIB:.1f} GiB; raise gpu_memory_utilization, shrink the "
            f"expert cache, or give kv_cache_memory_gb")
    return budget
