"""A pure latency model of decoding with offloaded experts: what tokens/s a cache configuration
should reach, from layer compute time, link bandwidth and replay hit/prefetch rates.

Per decode step and MoE layer, with t_x = expert_bytes / link bandwidth (one expert copy):
  - demand misses m (per layer visit) stall compute: each costs t_x on the critical path;
  - prefetches p (per layer visit) run on the link while the layer computes; the link is busy
    (m + p) t_x per layer, so a layer takes max(compute + m t_x, (m + p) t_x): prefetch hides
    transfers only while the link keeps up with compute.
  step = other + L * that;  tokens/s = batch / step.
Rates come from the replay simulator (hits, misses, prefetches per layer visit), which assumes
prefetches land in time; the max() above is where slower links show up instead.

`cpu_beats_transfer` is the Fiddler-style choice for a miss whose weights are in host RAM: run
the expert on the CPU when that is quicker than copying it to the GPU; `choose_host_experts`
applies it to one layer's misses (see docs/expert-cache.md, "Miss handling").
"""
from __future__ import annotations

from dataclasses import dataclass

from moe_rt.errors import MoeRtError


@dataclass(frozen=True)
class CostInputs:
    num_layers: int  # L, MoE layers
    layer_s: float  # seconds per layer per decode step with every expert resident (attention + experts)
    other_s: float  # seconds per step outside the MoE layers' loop (embedding, lm_head, sampling)
    expert_bytes: int  # bytes of one expert's weights
    link_bytes_per_s: float  # slow tier -> fast tier bandwidth
    misses_per_layer: float  # demand loads per layer visit
    prefetches_per_layer: float = 0.0  # prefetch loads per layer visit
    batch: int = 1  # sequences decoded per step

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.link_bytes_per_s <= 0 or self.batch < 1:
            raise MoeRtError("cost model: layers, link bandwidth and batch must be positive")
        if min(self.layer_s, self.other_s, self.misses_per_layer, self.prefetches_per_layer) < 0:
            raise MoeRtError("cost model: times and rates must not be negative")


def transfer_seconds(expert_bytes: int, link_bytes_per_s: float) -> float:
    return expert_bytes / link_bytes_per_s


def layer_seconds(c: CostInputs) -> float:
    t_x = transfer_seconds(c.expert_bytes, c.link_bytes_per_s)
    m, p = c.misses_per_layer, c.prefetches_per_layer
    return max(c.layer_s + m * t_x, (m + p) * t_x)


def step_seconds(c: CostInputs) -> float:
    return c.other_s + c.num_layers * layer_seconds(c)


def tokens_per_s(c: CostInputs) -> float:
    return c.batch / step_seconds(c)


def rates_from_replay(stats: dict, layer_visits: int) -> tuple[float, float]:
    """(misses, prefetches) per layer visit from a CacheStats.as_dict() of a replay."""
    if layer_visits < 1:
        raise MoeRtError("cost model: replay visited no layer")
    return stats["misses"] / layer_visits, stats["prefetches_issued"] / layer_visits


def cpu_beats_transfer(expert_bytes: int, link_bytes_per_s: float, cpu_expert_s: float) -> bool:
    """Fiddler's rule: compute a missed expert on the CPU if that takes less than copying it."""
    return cpu_expert_s < transfer_seconds(expert_bytes, link_bytes_per_s)


# Host estimates used until the runtime has timed its own host computations (assumptions: one
# socket's DRAM read bandwidth as torch reaches it, and a many-core CPU's fp32/bf16 GEMM rate).
HOST_BYTES_PER_S = 20e9
HOST_FLOPS = 1e12


@dataclass(frozen=True)
class HostRule:
    """Inputs of the host-or-load choice for the misses of one layer visit."""

    expert_bytes: int  # bytes one copy moves
    link_bytes_per_s: float  # host -> compute device (measured, or PCIE4_BYTES_PER_S)
    flops_per_row: float  # one token through one expert: 2 * 3 * D * I
    row_s: float | None = None  # measured host seconds per (token, expert) pair; None = not yet
    host_bytes_per_s: float = HOST_BYTES_PER_S
    host_flops: float = HOST_FLOPS


def host_expert_seconds(rows: int, rule: HostRule) -> float:
    """Host time of one expert on `rows` tokens: the measured per-row average once there is one;
    before that a roofline (read the weights once, or do the GEMM, whichever is slower)."""
    if rule.row_s is not None:
        return rows * rule.row_s
    return max(rule.expert_bytes / rule.host_bytes_per_s, rows * rule.flops_per_row / rule.host_flops)


def choose_host_experts(mode, missed_rows: dict[int, int], *, same_device: bool,
                        rule: HostRule) -> list[int]:
    """Which missed experts (id -> token rows routed to it) run on the host, sorted.

    mode False: none. "always": all. "auto": those where cpu_beats_transfer holds, and none when
    the host and the compute device are the same (a CPU-only machine): there a "copy" is a RAM
    copy and the compute is identical either way, so nothing is gained.
    """
    if mode is False or not missed_rows:
        return []
    if mode == "always":
        return sorted(missed_rows)
    if mode != "auto":
        raise MoeRtError(f"cost model: unknown host-compute mode {mode!r}")
    if same_device:
        return []
    return sorted(e for e, n in missed_rows.items()
                  if cpu_beats_transfer(rule.expert_bytes, rule.link_bytes_per_s,
                                        host_expert_seconds(n, rule)))


# Mixtral-8x7B on one 24 GB GPU over PCIe 4 (assumptions stated in docs/benchmarks-expert-cache.md).
MIXTRAL_LAYERS = 32
MIXTRAL_EXPERTS = 8
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # bf16: 352 MB
MIXTRAL_NON_EXPERT_BYTES = (32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) + 2 * 32000 * 4096) * 2  # 3.2 GB
PCIE4_BYTES_PER_S = 25e9
GPU_BYTES_PER_S = 900e9  # HBM/GDDR6X read bandwidth of a 24 GB card, decode is bandwidth bound


def mixtral_capacity_slots(gpu_bytes: float = 24e9, kv_and_runtime_bytes: float = 2.5e9) -> int:
    """Experts that fit in total after non-expert weights, KV cache and CUDA runtime."""
    free = gpu_bytes - MIXTRAL_NON_EXPERT_BYTES - kv_and_runtime_bytes
    return max(0, int(free // MIXTRAL_EXPERT_BYTES))


def mixtral_inputs(misses_per_layer: float, prefetches_per_layer: float = 0.0,
                   active_experts: float = 2.0) -> CostInputs:
    """Batch-1 decode: each layer reads `active_experts` experts plus attention at GPU bandwidth."""
    attn_bytes = (2 * 4096 * 4096 + 2 * 4096 * 1024) * 2
    layer_s = (active_experts * MIXTRAL_EXPERT_BYTES + attn_bytes) / GPU_BYTES_PER_S
    other_s = 2 * 32000 * 4096 * 2 / GPU_BYTES_PER_S
    return CostInputs(MIXTRAL_LAYERS, layer_s, other_s, MIXTRAL_EXPERT_BYTES, PCIE4_BYTES_PER_S,
                      misses_per_layer, prefetches_per_layer)
