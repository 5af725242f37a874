"""The `cache:` section of the expert-placement file (docs/placement.md), validated once.

The config holds what the user asked for. Values found at start-up (how many slots `capacity_gb`
buys for this model's expert size) are computed by `resolve_capacity_slots` and kept in runtime
state, never written back here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe_rt.errors import MoeRtError, validate_mapping

GIB = 1024 ** 3


class CacheConfig(BaseModel):
    """How experts are split between a bounded fast tier (GPU) and a slower tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity_slots: int | None = Field(
        None, ge=1,
        description="Fast-tier size in experts: per MoE layer with scope per_layer, in total with "
                    "scope global. Give this or capacity_gb, not both.")
    capacity_gb: float | None = Field(
        None, gt=0,
        description="Fast-tier size in GiB of expert weights across all MoE layers; turned into "
                    "slots at start-up from the model's expert size (per_layer: split evenly).")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer: each MoE layer has its own slots. global: one slot pool shared "
                    "by all layers, so busy layers can hold more experts than quiet ones.")
    offload: Literal["none", "cpu", "disk"] = Field(
        "cpu",
        description="Where non-resident experts live: none (all experts stay on the GPU, no "
                    "cache), cpu (pinned host RAM), disk (the checkpoint's safetensors files).")
    policy: Literal["lru", "lfu", "predictive"] = Field(
        "lru",
        description="Eviction policy. predictive keeps experts the predictor forecasts for the "
                    "coming layers and prefetches them; it needs the config's predictor section.")
    pinned: dict[int, list[int]] = Field(
        default_factory=dict,
        description="Experts that are always resident and never evicted, as {MoE layer index: "
                    "[expert ids]}. They count against the capacity.")
    lookahead: int | Literal["auto"] = Field(
        1,
        description="How many MoE layers ahead to predict and prefetch (>= 1), or auto: the "
                    "smallest depth whose prefetches finish before the layer runs, measured at "
                    "start-up from transfer and layer times.")
    prefetch_queue: int = Field(
        8, ge=0,
        description="Most prefetches issued after one layer; further ones are dropped, nearest "
                    "layers and highest scores kept. 0 disables prefetch.")
    copies_in_flight: int = Field(
        2, ge=1,
        description="GPU fast tier: most prefetch copies submitted to the copy stream at once. "
                    "The rest wait in a host-side queue, where a prefetch whose forecast is "
                    "withdrawn, whose layer runs without it, or whose slot a miss needs is "
                    "dropped without moving a byte; a copy on the stream cannot be taken back. "
                    "2 keeps the link busy (one copying, the next queued behind it). On a CPU "
                    "fast tier the one transfer worker reads one expert at a time anyway.")
    prefetch_rule: Literal["cost", "always"] = Field(
        "cost",
        description="Which forecast experts a prefetch loads. cost: only those whose expected "
                    "saving is positive (cost_model.prefetch_gain), from the forecast's "
                    "probability, the measured read and layer times, the transfer queue ahead "
                    "of it and the value of the expert it would evict. always: every forecast "
                    "expert up to prefetch_queue that may displace its victim (replay: "
                    "moe-rt simulate-cache --prefetch-rule always).")
    prefetch_switch: Literal["measured", "on"] = Field(
        "measured",
        description="Whether prediction stays on when it does not pay. measured: the cache "
                    "measures, per window of layer visits, the host time the predictor and "
                    "prefetch bookkeeping cost and the stall they save against a shadow LRU on "
                    "the same accesses, and turns prediction off (the cache then acts as LRU) "
                    "while the saving is below the cost or the loads exceed 1.1x LRU's, probing "
                    "again with a growing backoff (expert_cache/prefetch_switch.py). on: always "
                    "predict and prefetch.")
    prefetch_loads_budget: float | None = Field(
        1.1, ge=0,
        description="Most loads (demand misses plus prefetches) as a multiple of what a plain "
                    "LRU cache of the same size would load on the same accesses (a shadow LRU "
                    "counts them): a prefetch is issued only while loads + 1 <= budget x LRU's "
                    "loads (at the start, up to LRU's loads plus one prefetch_queue); demand "
                    "loads are never refused. Replay applies the same budget "
                    "(expert_cache/loads_budget.py). null or 0: no budget.")
    pack_dir: str | None = Field(
        None,
        description="offload disk: read experts from this expert pack (written by moe-rt "
                    "pack-experts: each expert one aligned, contiguous range, one O_DIRECT read). "
                    "A pack that is stale (its checkpoint changed) or corrupt is refused.")
    auto_pack: bool = Field(
        True,
        description="offload disk without pack_dir: on first use write a pack of the checkpoint's "
                    "experts in the compute dtype into the pack cache folder ($MOE_RT_PACK_CACHE, "
                    "default ~/.cache/moe-rt/packs/<checkpoint fingerprint>-<dtype>) and read from "
                    "it; a stale one there is rewritten. false: read the safetensors files directly.")
    cpu_compute_on_miss: Literal[False, "auto", "always"] = Field(
        False,
        description="What a miss whose weights are in host RAM does: false (load it into a "
                    "slot), auto (run it on the host where its weights are when the latency rule "
                    "cost_model.cpu_beats_transfer says that beats copying it; never on a "
                    "CPU-only machine, where both are the same RAM), always (run every such "
                    "miss on the host; for tests and experiments). true means auto. Needs "
                    "offload: cpu.")

    @field_validator("lookahead", mode="before")
    @classmethod
    def _lookahead_positive(cls, v: Any) -> Any:
        # Before the union is tried, so a bad value gets this message, not one per union branch.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"lookahead must be an integer >= 1 or 'auto', got {v!r}")

    @field_validator("cpu_compute_on_miss", mode="before")
    @classmethod
    def _miss_mode(cls, v: Any) -> Any:
        # YAML files written when this was a bool keep working: true is the latency rule.
        if v is True:
            return "auto"
        if v is False or v in ("auto", "always"):
            return v
        raise ValueError(f"cpu_compute_on_miss must be false, true (= auto), auto or always, "
                         f"got {v!r}")

    @field_validator("pinned")
    @classmethod
    def _pinned_ids(cls, v: dict[int, list[int]]) -> dict[int, list[int]]:
        for layer, experts in v.items():
            if layer < 0:
                raise ValueError(f"pinned layer {layer} is negative")
            if any(e < 0 for e in experts):
                raise ValueError(f"pinned experts of layer {layer} include a negative id")
            if len(set(experts)) != len(experts):
                raise ValueError(f"pinned experts of layer {layer} repeat an id: {experts}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "CacheConfig":
        given = [n for n in ("capacity_slots", "capacity_gb") if getattr(self, n) is not None]
        if self.offload == "none":
            extra = given + (["pinned"] if self.pinned else [])
            extra += ["cpu_compute_on_miss"] if self.cpu_compute_on_miss else []
            if extra:
                raise ValueError(f"offload: none keeps every expert on the GPU, so "
                                 f"{', '.join(extra)} would be ignored; remove it or set offload")
            if self.policy == "predictive":
                raise ValueError("offload: none has no cache, so policy predictive does nothing")
            return self
        if len(given) != 1:
            raise ValueError("give exactly one of capacity_slots and capacity_gb"
                             + (f" (both are set)" if len(given) == 2 else ""))
        if self.pack_dir is not None and self.offload != "disk":
            raise ValueError("pack_dir is read by the disk tier: it needs offload: disk")
        if self.cpu_compute_on_miss and self.offload != "cpu":
            raise ValueError("cpu_compute_on_miss needs offload: cpu (the weights must be in RAM)")
        if self.capacity_slots is not None:
            counts = {l: len(e) for l, e in self.pinned.items()}
            if self.scope == "per_layer" and counts and max(counts.values()) > self.capacity_slots:
                layer = max(counts, key=counts.get)
                raise ValueError(f"layer {layer} pins {counts[layer]} experts but capacity_slots "
                                 f"is {self.capacity_slots} per layer")
            if self.scope == "global" and sum(counts.values()) > self.capacity_slots:
                raise ValueError(f"{sum(counts.values())} pinned experts exceed capacity_slots "
                                 f"{self.capacity_slots}")
        return self

    @property
    def forecast_depth(self) -> int:
        """MoE layers ahead the prefetch predictor forecasts: lookahead, or with auto the most the
        adaptive depth may pick (4)."""
        return 4 if self.lookahead == "auto" else self.lookahead

    def pinned_keys(self) -> list[tuple[int, int]]:
        """Pinned experts as sorted (layer, expert) keys."""
        return sorted((l, e) for l, experts in self.pinned.items() for e in experts)

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Checks that need the model: pinned ids in range. Raises MoeRtError."""
        for layer, expert in self.pinned_keys():
            if layer >= num_layers:
                raise MoeRtError(f"cache: pinned layer {layer} but the model has {num_layers} "
                                 f"MoE layers (0..{num_layers - 1})")
            if expert >= num_experts:
                raise MoeRtError(f"cache: pinned expert {expert} of layer {layer} but the model "
                                 f"has {num_experts} experts per layer")

    def resolve_capacity_slots(self, expert_bytes: int, num_layers: int,
                               num_experts: int) -> int:
        """Slots per pool for this model (per layer, or in total for scope global).

        capacity_gb buys floor(budget / expert_bytes) slots, split evenly across layers when
        per_layer. Never more than the experts that exist; at least one slot is required.
        """
        if self.offload == "none":
            return num_experts if self.scope == "per_layer" else num_experts * num_layers
        if self.capacity_slots is not None:
            slots = self.capacity_slots
        else:
            if expert_bytes <= 0:
                raise MoeRtError(f"cache: expert size must be known to use capacity_gb, got "
                                 f"{expert_bytes} bytes")
            total = int(self.capacity_gb * GIB // expert_bytes)
            slots = total // num_layers if self.scope == "per_layer" else total
            if slots < 1:
                raise MoeRtError(f"cache: capacity_gb {self.capacity_gb} holds no expert "
                                 f"({expert_bytes / GIB:.3f} GiB each"
                                 f"{', per layer' if self.scope == 'per_layer' else ''})")
        most = num_experts if self.scope == "per_layer" else num_experts * num_layers
        return min(slots, most)


def load_cache_config(data: Any, where: str = "cache") -> CacheConfig:
    """Build a CacheConfig from parsed YAML/JSON; any problem raises a one-line MoeRtError."""
    return validate_mapping(CacheConfig, {} if data is None else data, where)
