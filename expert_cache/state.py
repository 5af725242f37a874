"""Cache state: which expert keys hold which fast-tier slots, and what happened to them.

`CacheState` is the single owner of residency: no executor keeps a second record (the cache's
per-layer slot map is `slot_map`, kept here). Each action has a check that says whether it is
allowed (`can_admit`/`admit`, `can_evict`/`evict`, `can_pin`/`pin`, `mark_in_flight`/`complete`,
`can_abort`/`abort_load`); an action whose check fails raises CacheStateError, which is a bug in
the caller, not a user error. Decisions come as plans from the pure planners (planning.py) and
are applied here (`apply_demand`, `apply_prefetch`, `apply_keep`), the same way by the in-engine
cache and the replay simulator. No copies happen here: the executor moves bytes.

Terms follow the glossary in docs/expert-cache.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from expert_cache.planning import DemandPlan, KeepPlan, Load, PrefetchPlan
from expert_cache.policies import ExpertKey, PolicyInputs

REUSE_BUCKETS = 8  # steps since a key's last use, bucketed up to this many (the last: older)

Scope = Literal["per_layer", "global"]
AccessResult = Literal["hit", "prefetch_hit", "miss"]


class CacheStateError(RuntimeError):
    """An action broke a cache invariant (evicting a pinned key, admitting into a full pool...)."""


@dataclass
class CacheStats:
    """Counters over a run. `hits` includes `prefetch_hits`; hits + misses = accesses."""

    hits: int = 0
    misses: int = 0  # demand loads (each one a stall in the engine)
    prefetch_hits: int = 0  # first hit on a key that a prefetch brought in
    prefetches_issued: int = 0
    wasted_prefetches: int = 0  # prefetched keys evicted before any hit
    wasted_prefetch_bytes: int = 0
    streamed_misses: int = 0  # misses served from a staging buffer without being admitted
    evictions: int = 0
    early_reloads: int = 0  # misses on a key evicted within the last num_layers visits (regret)
    bytes_moved: dict[str, int] = field(default_factory=dict)  # source tier ("cpu"/"disk") -> bytes
    stall_s: float = 0.0  # time compute waited for demand loads (filled by the executor)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def loads(self) -> int:
        """Every copy from the slow tier: demand misses plus prefetches."""
        return self.misses + self.prefetches_issued

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "prefetch_hits": self.prefetch_hits,
                "prefetches_issued": self.prefetches_issued,
                "wasted_prefetches": self.wasted_prefetches,
                "wasted_prefetch_bytes": self.wasted_prefetch_bytes,
                "streamed_misses": self.streamed_misses, "evictions": self.evictions,
                "early_reloads": self.early_reloads,
                "bytes_moved": dict(self.bytes_moved), "stall_s": self.stall_s,
                "accesses": self.accesses, "loads": self.loads, "hit_rate": self.hit_rate}


@dataclass
class SlotEntry:
    """One resident key."""

    slot: int  # index into its pool's fast-tier buffer
    pinned: bool = False
    in_flight: bool = False
    prefetched: bool = False  # brought by a prefetch (an aborted load takes its count back)
    prefetched_unused: bool = False  # brought by a prefetch and not hit yet
    prior_use: int = -1  # the key's last use before this load (a wrong prefetch falls back to it)


@dataclass
class CacheState:
    """Residency of expert keys in fast-tier slot pools, plus per-key and total statistics.

    scope "per_layer": one pool per MoE layer, each with `capacity_slots` slots.
    scope "global": one pool (id 0) of `capacity_slots` slots shared by all layers.

    Width classes (an expert bits plan, docs/expert-cache.md "Width pools"): with `class_of`,
    each key has a class c in [0, classes) and its pool is base * classes + c (base: its layer,
    or 0 for scope global), so a key only ever takes or frees a slot of its own width;
    `pool_slots` gives each pool its own capacity and `class_bytes` each class's bytes per
    expert. Without them (the default) there is one class and everything is as described above.
    """

    num_layers: int  # L, MoE layers
    capacity_slots: int  # slots per pool (per layer, or in total for scope "global")
    scope: Scope = "per_layer"
    expert_bytes: int = 0  # bytes of one expert's weights (0 when unknown, e.g. id-only replay)
    source_tier: str = "cpu"  # where loads come from: "cpu" (pinned host RAM) or "disk"
    entries: dict[ExpertKey, SlotEntry] = field(default_factory=dict)
    free_slots: dict[int, list[int]] = field(default_factory=dict)  # pool -> free slots (a stack)
    pool_keys: dict[int, set[ExpertKey]] = field(default_factory=dict)  # pool -> resident keys
    # layer -> {expert: slot} of its resident keys: an index over `entries` (same transitions),
    # so the executor's per-layer slot map is read from here, never kept beside it.
    layer_slots: dict[int, dict[int, int]] = field(default_factory=dict)
    needed: set[ExpertKey] = field(default_factory=set)  # keys of the layer being computed
    # Protected keys kept as sets (mirroring the entries' flags) so candidates() is a set
    # difference: replay asks for candidates on every miss.
    pinned_keys: set[ExpertKey] = field(default_factory=set)
    in_flight_keys: set[ExpertKey] = field(default_factory=set)
    # Per-key history, kept across evictions (LRU/LFU read these dicts directly, without copies).
    last_use: dict[ExpertKey, int] = field(default_factory=dict)  # tick of last access or load
    use_count: dict[ExpertKey, int] = field(default_factory=dict)  # accesses
    load_count: dict[ExpertKey, int] = field(default_factory=dict)  # loads (demand + prefetch)
    evicted_at: dict[ExpertKey, int] = field(default_factory=dict)  # tick of the last eviction
    # Reuse by recency, counted at each layer visit over the layer's keys used before: bucket r
    # holds keys last used r+1 steps (visits of their layer) earlier, the last bucket all older.
    reuse_seen: list[int] = field(default_factory=lambda: [0] * REUSE_BUCKETS)
    reuse_used: list[int] = field(default_factory=lambda: [0] * REUSE_BUCKETS)
    known: dict[int, set[ExpertKey]] = field(default_factory=dict)  # layer -> keys ever used
    _now: int = 0  # tick of the latest access (evictions are stamped with it)
    stats: CacheStats = field(default_factory=CacheStats)
    class_of: Callable[[ExpertKey], int] | None = None  # key -> width class (None: one class)
    classes: int = 1
    pool_slots: dict[int, int] | None = None  # pool -> slots (None: capacity_slots for every pool)
    class_bytes: tuple[int, ...] | None = None  # bytes of one expert of each class

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.capacity_slots < 0:
            raise ValueError(f"capacity_slots must be >= 0, got {self.capacity_slots}")
        if self.scope not in ("per_layer", "global"):
            raise ValueError(f"scope must be per_layer or global, got {self.scope!r}")
        if not self.free_slots and not self.entries:
            bases = self.num_layers if self.scope == "per_layer" else 1
            pools = range(bases * self.classes)
            # Reversed so pop() hands out slot 0 first: deterministic, easy to read in tests.
            self.free_slots = {p: list(reversed(range(self.capacity(p)))) for p in pools}
            self.pool_keys = {p: set() for p in pools}

    # ---- queries ----
    def pool_of(self, key: ExpertKey) -> int:
        layer = key[0]
        if not 0 <= layer < self.num_layers:
            raise CacheStateError(f"key {key} names MoE layer {layer}, outside [0, {self.num_layers})")
        base = layer if self.scope == "per_layer" else 0
        return base if self.class_of is None else base * self.classes + self.class_of(key)

    def capacity(self, pool: int) -> int:
        """Slots of `pool`."""
        return self.capacity_slots if self.pool_slots is None else self.pool_slots[pool]

    def key_bytes(self, key: ExpertKey) -> int:
        """Bytes one load of `key` moves (its width class's, or expert_bytes)."""
        return self.expert_bytes if self.class_bytes is None else self.class_bytes[self.class_of(key)]

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self.entries

    def slot_of(self, key: ExpertKey) -> int | None:
        e = self.entries.get(key)
        return None if e is None else e.slot

    def slot_map(self, layer: int, num_experts: int) -> list[int]:
        """Slot of each logical expert of `layer` in its pool, -1 where not resident ([E])."""
        out = [-1] * num_experts
        for e, slot in self.layer_slots.get(layer, {}).items():
            out[e] = slot
        return out

    def num_free(self, pool: int) -> int:
        return len(self.free_slots[pool])

    def in_flight(self) -> set[ExpertKey]:
        return set(self.in_flight_keys)

    def pinned(self) -> set[ExpertKey]:
        return set(self.pinned_keys)

    def candidates(self, pool: int, exclude: Iterable[ExpertKey] = ()) -> set[ExpertKey]:
        """Eviction candidates of `pool`: resident minus pinned, in-flight and needed (unordered;
        policies impose the order), and minus `exclude` (what a plan already chose). Same result
        as policies.eviction_candidates, in one pass over the pool."""
        return self.pool_keys[pool].difference(self.pinned_keys, self.in_flight_keys, self.needed,
                                               exclude)

    def policy_inputs(self, predicted=None, next_use=None, position=None) -> PolicyInputs:
        """Inputs for policies.choose_victims; shares this state's dicts rather than copying."""
        return PolicyInputs(self.last_use, self.use_count, predicted or {}, next_use or {}, position)

    def reuse_probabilities(self) -> tuple[float, ...]:
        """Measured chance a key is used at a visit of its layer, per bucket of steps since its
        last use (policies.Position.reuse); (used + 1) / (seen + 2) so no bucket is 0 or 1, and
        never rising with age (a running minimum): an older key is taken as no likelier than a
        more recent one, so noise in the counts cannot reorder a pool against recency."""
        out, low = [], 1.0
        for u, n in zip(self.reuse_used, self.reuse_seen):
            low = min(low, (u + 1) / (n + 2))
            out.append(low)
        return tuple(out)

    def _forget_wrong_prefetches(self, keys: tuple[ExpertKey, ...]) -> None:
        """Before a visit's accesses: a resident prefetch of this layer that the visit does not
        use was a wrong forecast. Its load counted as a use so LRU would not evict it before it
        was read; it now was passed over, so its recency falls back to its last real use (a
        never-used key: the least recent), and neither recency ranking nor the reuse counts
        take it for a key just used."""
        if not keys:
            return
        used = set(keys)
        for e_id in self.layer_slots.get(keys[0][0], {}):
            key = (keys[0][0], e_id)
            e = self.entries[key]
            if e.prefetched_unused and not e.in_flight and key not in used:
                if e.prior_use < 0:
                    self.last_use.pop(key, None)
                else:
                    self.last_use[key] = e.prior_use

    def _count_reuse(self, keys: tuple[ExpertKey, ...], now: int) -> None:
        """Before a visit's accesses: for each key its layer used before, was it used again."""
        if not keys:
            return
        layer, L = keys[0][0], self.num_layers
        known = self.known.setdefault(layer, set())
        used = set(keys)
        last = self.last_use
        for k in known:
            r = min((now - last[k] - 1) // L, REUSE_BUCKETS - 1)
            if r >= 0:
                self.reuse_seen[r] += 1
                self.reuse_used[r] += k in used
        known.update(used)

    def victim_reuse(self, prior: float = 0.5, weight: float = 4.0) -> float:
        """Measured chance that an evicted key is missed again within one step (num_layers
        visits): early_reloads / evictions, pulled towards `prior` while evictions are few.
        What evicting an unforecast key is expected to cost (cost_model.prefetch_gain)."""
        st = self.stats
        return (st.early_reloads + prior * weight) / (st.evictions + weight)

    # ---- check/action pairs ----
    def can_admit(self, key: ExpertKey) -> bool:
        return key not in self.entries and self.num_free(self.pool_of(key)) > 0

    def admit(self, key: ExpertKey, now: int, *, prefetch: bool = False,
              in_flight: bool = False) -> int:
        """Give `key` a free slot of its pool and count the load; returns the slot."""
        if not self.can_admit(key):
            why = "already resident" if key in self.entries else "its pool has no free slot"
            raise CacheStateError(f"cannot admit {key}: {why}")
        pool = self.pool_of(key)
        slot = self.free_slots[pool].pop()
        self.entries[key] = SlotEntry(slot, in_flight=in_flight, prefetched=prefetch,
                                      prefetched_unused=prefetch, prior_use=self.last_use.get(key, -1))
        self.pool_keys[pool].add(key)
        self.layer_slots.setdefault(key[0], {})[key[1]] = slot
        self.evicted_at.pop(key, None)  # back before it was missed: no regret to count
        if in_flight:
            self.in_flight_keys.add(key)
        # A fresh load counts as a use for recency, so LRU does not evict it before it is read.
        self.last_use[key] = now
        self.load_count[key] = self.load_count.get(key, 0) + 1
        self._count_bytes(key)
        if prefetch:
            self.stats.prefetches_issued += 1
        return slot

    def can_evict(self, key: ExpertKey) -> bool:
        e = self.entries.get(key)
        return e is not None and not e.pinned and not e.in_flight and key not in self.needed

    def evict(self, key: ExpertKey) -> int:
        """Free `key`'s slot; returns it. Pinned, in-flight and needed keys are refused."""
        if not self.can_evict(key):
            e = self.entries.get(key)
            why = ("not resident" if e is None else "pinned" if e.pinned
                   else "in flight" if e.in_flight else "needed by the current layer")
            raise CacheStateError(f"cannot evict {key}: {why}")
        e = self._release(key)
        self.stats.evictions += 1
        self.evicted_at[key] = self._now
        if e.prefetched_unused:
            self.stats.wasted_prefetches += 1
            self.stats.wasted_prefetch_bytes += self.key_bytes(key)
        return e.slot

    def can_abort(self, key: ExpertKey) -> bool:
        e = self.entries.get(key)
        return e is not None and e.in_flight and not e.pinned

    def abort_load(self, key: ExpertKey) -> int:
        """A copy into `key`'s slot was cancelled before it started, or failed: the slot holds no
        (or partial) bytes. Free it and take back the load's counts (bytes, prefetch issued); it
        is neither an eviction nor a wasted prefetch. Returns the freed slot."""
        if not self.can_abort(key):
            e = self.entries.get(key)
            why = "not resident" if e is None else "pinned" if e.pinned else "not in flight"
            raise CacheStateError(f"cannot abort the load of {key}: {why}")
        e = self._release(key)
        self.in_flight_keys.discard(key)
        self.load_count[key] -= 1
        moved = self.stats.bytes_moved
        moved[self.source_tier] -= self.key_bytes(key)
        if e.prefetched:
            self.stats.prefetches_issued -= 1
        return e.slot

    def _release(self, key: ExpertKey) -> SlotEntry:
        e = self.entries.pop(key)
        pool = self.pool_of(key)
        self.pool_keys[pool].discard(key)
        del self.layer_slots[key[0]][key[1]]
        self.free_slots[pool].append(e.slot)
        return e

    def can_pin(self, key: ExpertKey) -> bool:
        return key in self.entries or self.can_admit(key)

    def pin(self, key: ExpertKey, now: int = 0) -> int:
        """Make `key` resident for good (admitting it if needed); returns its slot."""
        if not self.can_pin(key):
            raise CacheStateError(f"cannot pin {key}: its pool has no free slot")
        if key not in self.entries:
            self.admit(key, now)
        self.entries[key].pinned = True
        self.pinned_keys.add(key)
        return self.entries[key].slot

    def mark_in_flight(self, key: ExpertKey) -> None:
        e = self.entries.get(key)
        if e is None or e.in_flight:
            raise CacheStateError(f"cannot mark {key} in flight: "
                                  f"{'not resident' if e is None else 'already in flight'}")
        e.in_flight = True
        self.in_flight_keys.add(key)

    def complete(self, key: ExpertKey) -> None:
        e = self.entries.get(key)
        if e is None or not e.in_flight:
            raise CacheStateError(f"cannot complete {key}: "
                                  f"{'not resident' if e is None else 'not in flight'}")
        e.in_flight = False
        self.in_flight_keys.discard(key)

    def mark_needed(self, keys: Iterable[ExpertKey]) -> None:
        """Protect the keys of the layer about to compute (resident or not yet)."""
        self.needed.update(keys)

    def clear_needed(self) -> None:
        self.needed.clear()

    # ---- accounting ----
    def access(self, key: ExpertKey, now: int) -> AccessResult:
        """Record one compute-time access to `key` and classify it. A miss changes no residency:
        the executor then admits (after evicting) or streams the key."""
        self.last_use[key] = now
        self._now = now
        self.use_count[key] = self.use_count.get(key, 0) + 1
        e = self.entries.get(key)
        if e is None:
            self.stats.misses += 1
            gone = self.evicted_at.pop(key, None)
            if gone is not None and now - gone <= self.num_layers:
                self.stats.early_reloads += 1
            return "miss"
        self.stats.hits += 1
        if e.prefetched_unused:
            e.prefetched_unused = False
            self.stats.prefetch_hits += 1
            return "prefetch_hit"
        return "hit"

    def record_streamed(self, key: ExpertKey) -> None:
        """A missed key was loaded into staging only; its bytes still moved."""
        self.load_count[key] = self.load_count.get(key, 0) + 1
        self.stats.streamed_misses += 1
        self._count_bytes(key)

    # ---- applying plans (planning.py) ----
    def apply_demand(self, plan: DemandPlan, now: int, *,
                     in_flight: bool = False) -> dict[ExpertKey, AccessResult]:
        """Access every key of the visit, then evict and admit as planned (loads `in_flight` until
        the executor's copy completes, so a failed copy can be aborted), and count the streamed
        misses. Returns each key's access result. The visit's keys should be marked needed."""
        self._forget_wrong_prefetches(plan.keys)
        self._count_reuse(plan.keys, now)
        results = {key: self.access(key, now) for key in plan.keys}
        for load in plan.loads:
            self._load(load, now, in_flight=in_flight)
        for key in plan.streamed:
            self.record_streamed(key)
        return results

    def apply_prefetch(self, plan: PrefetchPlan, now: int, *, in_flight: bool) -> None:
        """Admit the planned prefetches (in flight until `complete` when the executor copies
        asynchronously; replay's copies are instant)."""
        for load in plan.loads:
            self._load(load, now, prefetch=True, in_flight=in_flight)

    def apply_keep(self, plan: KeepPlan, now: int) -> None:
        for key in plan.evict:
            self.evict(key)
        for key in plan.admit:
            self.admit(key, now)
        for key in plan.streamed:
            self.record_streamed(key)

    def _load(self, load: Load, now: int, **kw) -> None:
        if load.victim is not None:
            self.evict(load.victim)
        slot = self.admit(load.key, now, **kw)
        if slot != load.slot:
            raise CacheStateError(f"stale plan: {load.key} planned into slot {load.slot}, got {slot}")

    def check_consistent(self) -> None:
        """Raise CacheStateError if the indexes disagree with `entries` (tests call this)."""
        by_layer: dict[int, dict[int, int]] = {}
        for (layer, e), entry in self.entries.items():
            by_layer.setdefault(layer, {})[e] = entry.slot
        problems = []
        if {l: m for l, m in self.layer_slots.items() if m} != by_layer:
            problems.append("layer_slots differ from entries")
        if set().union(*self.pool_keys.values()) != set(self.entries):
            problems.append("pool_keys differ from entries")
        for pool, keys in self.pool_keys.items():
            used = sorted(self.entries[k].slot for k in keys)
            if sorted(used + self.free_slots[pool]) != list(range(self.capacity(pool))):
                problems.append(f"pool {pool}: used + free slots are not each slot once")
        if self.pinned_keys != {k for k, e in self.entries.items() if e.pinned}:
            problems.append("pinned_keys differ from entries")
        if self.in_flight_keys != {k for k, e in self.entries.items() if e.in_flight}:
            problems.append("in_flight_keys differ from entries")
        if problems:
            raise CacheStateError("; ".join(problems))

    def add_stall(self, seconds: float) -> None:
        self.stats.stall_s += seconds

    def _count_bytes(self, key: ExpertKey) -> None:
        moved = self.stats.bytes_moved
        moved[self.source_tier] = moved.get(self.source_tier, 0) + self.key_bytes(key)
