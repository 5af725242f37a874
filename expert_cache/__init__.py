"""Expert cache: a bounded fast tier of expert weights in front of a slower tier.

The terms used throughout this package (expert key, logical expert vs physical slot, pool,
resident, pinned, in flight, needed, eviction candidates, hit/miss, prefetch hit, wasted
prefetch, streamed miss, loads) are defined once, in the glossary of docs/expert-cache.md.
The rules code here relies on most: pinned, in-flight and needed keys are never evicted, and
policies only ever see the eviction candidates (resident minus those three).

Modules: `policies` (pure victim choice), `planning` (pure planners of demand loads, prefetches
and evictions, shared by replay and the cache), `state` (residency + stats, check/action pairs,
applies plans), `forecast` (predictor scores -> per-key forecasts, prefetch order), `config`
(the `cache:` section of the placement file), `cache` (ExpertCache, the in-engine executor),
`transfer`, `slow_tier`, `prefetcher`, `install`, `simulator` (trace replay, Belady bound),
`plots` (`moe-rt simulate-cache`).
"""
