"""Expert cache: a bounded fast tier of expert weights in front of a slower tier.

Glossary (the one place these terms are defined; code and docs use them in this sense):

expert key
    `(layer, expert)`: `layer` is the MoE-layer index 0..L-1 (not the decoder-layer id), `expert`
    the logical expert id 0..E-1 the router emits. Keys never mention physical placement.
logical expert vs physical slot
    A logical expert is what the router picks. A physical slot is one place in a fast-tier buffer
    able to hold one expert's weights. The cache maps resident keys to slots; a slot belongs to a
    pool (one pool per MoE layer with scope `per_layer`, one shared pool with scope `global`).
resident
    The key holds a slot. Its bytes may still be arriving (in flight) or be ready.
pinned
    Resident for the cache's whole life and never evicted (set from config at start-up). Pinned
    keys still occupy slots of their pool.
in flight
    A copy into the key's slot has been issued but not completed. Never evicted: the copy would
    land in a slot that now belongs to someone else.
needed
    Used by the layer being computed right now. Never evicted: the kernel reads the slot.
eviction candidates
    Resident keys minus pinned, in-flight and needed ones. Policies only ever choose among these.
hit / miss
    At compute time, one access per distinct (layer, expert) of the batch (the union over its
    tokens). A hit finds the key resident; a miss must load it first (a demand load, a stall).
prefetch / prefetch hit / wasted prefetch
    A prefetch loads a key before it is needed, because a predictor forecast it. A prefetch hit
    is the first hit on a prefetched key. A wasted prefetch is a prefetched key evicted before
    any hit; its bytes count as wasted prefetch bytes.
streamed miss (bypass)
    A miss whose key is not admitted (no slot can be freed, or Belady judges keeping it useless):
    it is loaded into a staging buffer for this layer only.
loads
    Demand misses plus prefetches issued: every copy from the slow tier. Prefetching can raise the
    hit rate above Belady's, never lower the loads below Belady's misses (docs/expert-cache.md).

Modules: `policies` (pure victim choice), `state` (residency + stats, check/action pairs),
`config` (the `cache:` section of the placement file), `simulator` (trace replay),
`cli_simulate` (`moe-rt simulate-cache`).
"""
