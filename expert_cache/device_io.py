"""What the cache reads from the device and sends to it in each MoE layer, with at most one wait.

The cache decides residency on the host (CacheState and the planners are Python), from the expert
ids the router has just chosen, so it must read them: that is the one host read per MoE layer the
cache keeps on CUDA (`ids_on_host`, in ExpertCache.prepare). It is one non-blocking copy into
pinned memory and a wait on an event recorded after it, which waits for the router (queued
before it), not for anything queued later; it replaces a boolean-mask index, a `unique` and a
`tolist` on the device, each a sync of its own. Everything the cache sends the other way (slot
maps) goes by non-blocking copies from pinned memory, so the host never waits for the device.

On the CPU every function here is the plain operation: no copies, no events.
"""
from __future__ import annotations

import torch


class HostCopies:
    """Copies of device tensors into pinned host memory, started now and waited for later
    (`wait`), so the device can run what is queued after them meanwhile."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event = None
        if all(t.device.type == "cpu" for t in tensors):
            self._tensors = tensors
            return
        # non_blocking device -> CPU copies land in pinned memory (torch allocates it so)
        self._tensors = tuple(t.to("cpu", non_blocking=True) for t in tensors)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors


def ids_on_host(topk_ids: torch.Tensor) -> torch.Tensor:
    """topk_ids [T, K] on the host (the one host read per MoE layer; see the module doc)."""
    return HostCopies(topk_ids).wait()[0]


def used_experts(ids: torch.Tensor) -> list[int]:
    """The distinct expert ids chosen in host ids [T, K] (-1 = none), ascending."""
    return ids[ids >= 0].unique().tolist()


def pinned_zeros(like: torch.Tensor) -> torch.Tensor:
    """Host zeros shaped like `like`, pinned when `like` is on a GPU (so `to_device` of it does
    not wait for the device)."""
    return torch.zeros(like.shape, dtype=like.dtype, pin_memory=like.device.type == "cuda")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host wait: from pinned memory, non-blocking (the
    caching host allocator keeps the pinned block until the copy is done)."""
    if device.type == "cpu":
        return host
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def slot_map(slots: list[int], device: torch.device) -> torch.Tensor:
    """A slot map [E] int64 on `device` (LayerExperts.slot_of)."""
    return to_device(torch.tensor(slots, dtype=torch.int64), device)
