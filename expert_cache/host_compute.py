"""Host compute of misses (cache: cpu_compute_on_miss): a missed expert runs on the host, where
its weights are, instead of being copied to the fast tier (Fiddler's rule,
cost_model.choose_host_experts). The slow tier must hold whole layers in RAM
(`SlowTier.host_layer`); otherwise the mode is off.

A host expert stays unmapped for its layer (slot_of -1), so the device backend skips exactly the
choices `LayerExperts.host_compute` adds. Shape legend: E experts per layer, T tokens, K experts
per token, I expert intermediate size, D hidden size.
"""
from __future__ import annotations

import time

import torch

from expert_cache.cost_model import PCIE4_BYTES_PER_S, HostRule, choose_host_experts
from expert_cache.device_io import HostCopies, pinned_zeros, to_device
from expert_cache.policies import ExpertKey
from expert_cache.prefetcher import MovingAverage
from expert_cache.slow_tier import SlowTier
from moe_rt.kernels.loop import loop_experts
from moe_rt.layers.moe.compute_quant import quantized_experts
from moe_rt.quant.experts import QuantizedStack


class HostCompute:
    """Which misses run on the host, the host_compute function that runs them, and what it
    measured (host seconds per (token, expert) pair; the link's bytes/s, which the cache's copy
    timings also feed)."""

    def __init__(self, tier: SlowTier, mode, *, num_experts: int, expert_bytes: int,
                 flops_per_row: int, device: torch.device) -> None:
        """mode: cfg.cpu_compute_on_miss (False, "auto" or "always")."""
        self.tier, self.num_experts, self.device = tier, num_experts, device
        self.mode = mode if tier.host_layer(0) is not None else False
        self._expert_bytes, self._flops_per_row = expert_bytes, flops_per_row
        self.row_s = MovingAverage()  # host seconds per (token, expert) pair, measured
        self.link_bps = MovingAverage()  # host -> device bytes/s, measured (CUDA, auto only)
        self.computed = 0  # experts (layer visits) run on the host
        self.rows = 0  # (token, expert) pairs run on the host
        self.seconds = 0.0
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None  # (device ids, host copy)
        if self.mode == "auto" and self.device.type == "cuda":
            self._measure_link()

    def saw(self, topk_ids: torch.Tensor, ids: torch.Tensor) -> None:
        """prepare read the layer's routed ids to the host (`ids`): host_compute does not copy
        them again."""
        self.seen = (topk_ids, ids)

    def choose(self, ids: torch.Tensor, missed: list[ExpertKey]) -> list[int]:
        """Missed expert ids of the layer to run on the host (cost_model.choose_host_experts);
        ids: the layer's routed ids [T, K], on the host."""
        if not missed or self.mode is False:
            return []
        flat = ids[ids >= 0]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rule = HostRule(self._expert_bytes, self.link_bps.value or PCIE4_BYTES_PER_S,
                        self._flops_per_row, self.row_s.value)
        return choose_host_experts(self.mode, {e: counts[e] for _, e in missed},
                                   same_device=self.device.type == "cpu", rule=rule)

    def compute_fn(self, l: int, host: list[int]):
        """LayerExperts.host_compute for layer l: the weighted sum over the choices routed to the
        `host` experts, computed with the host tier's weights (no copy of them is made).

        Called before the device kernels of the layer are queued, it only starts the copies of
        its inputs to the host; the `finish` it returns, called after them, waits for those
        copies (queued before the device experts, so not for them), runs the host GEMMs while
        the device computes, and sends the partial output back without a host wait."""
        w13, w2 = self.tier.host_layer(l)  # [E, 2I, D], [E, D, I] by logical id
        on_host = torch.zeros(self.num_experts, dtype=torch.bool)
        on_host[host] = True
        seen = self.seen  # the routed ids prepare read: not copied again

        def host_compute(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
            known = seen is not None and topk_ids is seen[0]
            copies = HostCopies(hidden, topk_weights, *(() if known else (topk_ids,)))

            def finish() -> torch.Tensor:
                x_all, w_all, *rest = copies.wait()
                ids = seen[1] if known else rest[0]
                mine = (ids >= 0) & on_host[ids.clamp(min=0)]  # [T, K] choices computed here
                rows = mine.any(dim=1).nonzero().squeeze(1)  # tokens with at least one such choice
                out = pinned_zeros(hidden)
                if rows.numel() == 0:
                    return to_device(out, hidden.device)
                sub_ids = torch.where(mine[rows], ids[rows], -1)  # other choices ran on the device
                x, w = x_all.index_select(0, rows), w_all.index_select(0, rows)
                t0 = time.perf_counter()
                y = (quantized_experts if isinstance(w13, QuantizedStack) else loop_experts)(x, w13, w2, sub_ids, w)
                seconds = time.perf_counter() - t0
                out.index_add_(0, rows, y)
                pairs = int(mine.sum())
                self.rows += pairs
                self.seconds += seconds
                self.row_s.add(seconds / pairs)
                return to_device(out, hidden.device)

            return finish

        return host_compute

    def _measure_link(self) -> None:
        """Time one expert host -> device copy, synchronised (the transfer engine's own times do
        not wait for the GPU copy), as the first sample of the link bandwidth."""
        w13, w2 = self.tier.host_weights((0, 0))
        d13, d2 = torch.empty_like(w13, device=self.device), torch.empty_like(w2, device=self.device)
        for _ in range(2):  # the first copy pays one-off setup costs
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            d13.copy_(w13, non_blocking=True)
            d2.copy_(w2, non_blocking=True)
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
        self.link_bps.add(self._expert_bytes / max(seconds, 1e-9))
