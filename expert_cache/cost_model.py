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

import math
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


# ---- the prefetch rule (runtime and replay alike) --------------------------------------------
@dataclass(frozen=True)
class PrefetchCosts:
    """What a prefetch decision weighs, measured online by the cache (or given to replay).

    A wasted prefetch costs a full read of link time (the disk tier is bound by bytes moved: it
    delays every read behind it) and, when it evicted something, the chance that victim is
    read back (`victim_reuse`, a full read again). A useful one takes off the critical path the
    part of a demand read that lands before its layer runs."""

    read_s: float  # seconds per expert read from the slow tier (t_x)
    layer_s: float  # seconds of compute per MoE layer (stalls excluded)
    queued: int = 0  # reads already ahead in the transfer queue (incl. the one in progress)
    victim_reuse: float = 0.5  # chance an unforecast victim is needed again before it would go
    demand_per_layer: float = 0.0  # demand reads a layer visit makes (they share the link)

    def __post_init__(self) -> None:
        if self.read_s < 0 or self.layer_s < 0 or self.queued < 0:
            raise MoeRtError("prefetch costs: times and queue length must not be negative")
        if not 0.0 <= self.victim_reuse <= 1.0:
            raise MoeRtError(f"prefetch costs: victim_reuse must be in [0, 1], got {self.victim_reuse}")


def bytes_only_costs() -> PrefetchCosts:
    """The cost rule with no times known (replay without --read-ms/--layer-ms): an idle link
    on which every prefetch lands in time, so a right one saves a whole read and a wasted one
    costs a read plus its victim's reuse: prefetch_gain > 0 iff p > (1 + v) / (2 + v), i.e.
    0.5 into a free slot and more the likelier the victim is needed. Weighs the bytes a prefetch
    moves against the demand reads it saves, which is what a bytes-bound link pays."""
    return PrefetchCosts(read_s=1.0, layer_s=math.inf)


def hidden_seconds(distance: int, position: int, c: PrefetchCosts) -> float:
    """How much of one read a prefetch hides: it has `distance` layer-times until its layer
    runs, and the link first serves the `position` reads ahead of it (queued + those issued
    before it now) and the demand reads of the layers in between (demand_per_layer each); a
    late one still saves the part that landed. In [0, read_s]. On a saturated link (demand
    reads alone fill the layer time) nothing is hidden: prefetch only moves reads around."""
    ahead = position + c.demand_per_layer * max(distance - 1, 0)
    return min(c.read_s, max(0.0, distance * c.layer_s - ahead * c.read_s))


def prefetch_gain(prob: float, distance: int, position: int, victim_prob: float | None,
                  c: PrefetchCosts, victim_now: float = 0.0) -> float:
    """Expected seconds a prefetch saves (> 0: issue it).

      gain = p * hidden - (1 - p) * read_s * (1 + v) - u * (hidden + read_s)

    p: chance the key is used at its layer; hidden: hidden_seconds; v: the displaced key's
    chance of being needed again later (its measured reuse, c.victim_reuse when unknown, 0 for a
    free slot: `victim_prob` None); u (`victim_now`): the displaced key's chance of being used
    at its own forecast visit (its forecast probability; 0 when unforecast). A wasted prefetch
    costs its read and, with chance v, reading the victim back; when the prefetch is right and
    the victim was not needed now, the demand load it replaces would have evicted some such key
    anyway, so only a wasted one pays for v. A victim needed now is a miss the prefetch caused:
    a demand read on the critical path, and the stall the prefetch hid is lost with it (two
    keys of one visit swapped: a read for nothing). On an idle link (hidden = read_s) the rule
    is p > (1 + v) / (2 + v) for an unforecast victim and p > 1/2 + u for one forecast now."""
    v = 0.0 if victim_prob is None else victim_prob
    h = hidden_seconds(distance, position, c)
    return prob * h - (1.0 - prob) * c.read_s * (1.0 + v) - victim_now * (h + c.read_s)


def prefetch_threshold(distance: int, position: int, victim_prob: float | None,
                       c: PrefetchCosts, victim_now: float = 0.0) -> float:
    """The smallest probability at which prefetch_gain is positive (> 1: never)."""
    v = 0.0 if victim_prob is None else victim_prob
    waste = c.read_s * (1.0 + v)
    h = hidden_seconds(distance, position, c)
    return (waste + victim_now * (h + c.read_s)) / (h + waste) if h + waste > 0 else 1.0


def lookahead_depth(loads_per_layer: float | None, read_s: float | None, layer_s: float | None,
                    max_depth: int) -> int:
    """`lookahead: auto`: layers ahead to prefetch so one layer's expected loads (misses a
    prefetch should replace) land in time: ceil(loads x read time / layer time), in
    [1, max_depth]; 1 until measured."""
    if read_s is None or not layer_s or not loads_per_layer:
        return 1
    return max(1, min(max_depth, math.ceil(loads_per_layer * read_s / layer_s)))


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
