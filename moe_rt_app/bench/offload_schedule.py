"""`moe-rt bench offload --scheduler-policy fcfs,expert_aware`: scheduling policies compared with
experts offloaded, many sequences decoding at once.

Each policy gets its own engine (experts on disk behind an LRU cache of the first --capacities
percentage, --concurrency sequences running); repeats are interleaved (fcfs, expert_aware, fcfs,
...) so the noise of a shared machine falls on both sides alike. Every figure is printed for each
policy as its median and best over the repeats, and as the ratio of medians to the first policy
(the baseline, fcfs), measured in the same run:

  tok_s                 generated tokens / wall time of the run (prefill included)
  decode_tok_s          tokens after each sequence's first / time from the first token to the last
  experts_per_layer_step  distinct experts one MoE layer used per decode-only step (the union)
  loads_per_token       expert-cache loads per generated token
  ttft_ms               time to first token, mean over sequences
  tpot_p50_ms, tpot_p99_ms  time between successive tokens of one sequence, over all sequences
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from moe_rt.errors import MoeRtError

POLICIES = ("fcfs", "expert_aware")
FIGURES = ("tok_s", "decode_tok_s", "experts_per_layer_step", "loads_per_token", "ttft_ms", "tpot_p50_ms",
           "tpot_p99_ms")
LOWER_IS_BETTER = {"experts_per_layer_step", "loads_per_token", "ttft_ms", "tpot_p50_ms", "tpot_p99_ms"}


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise MoeRtError(f"--scheduler-policy: unknown policy {bad[0] if bad else text!r}; choose from "
                         f"{', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


class _UnionMeter:
    """Distinct experts per MoE layer in decode-only forwards (every row its own sequence)."""

    def __init__(self, hub) -> None:
        self.total = self.events = 0
        self._off = hub.subscribe(self._on)

    def _on(self, e) -> None:
        if e.batch is not None and len(e.batch.seq_ids) == len(set(e.batch.seq_ids.tolist())):
            ids = e.topk_ids
            self.total += int(ids[ids >= 0].unique().numel())
            self.events += 1

    def close(self) -> None:
        self._off()


def _one_run(llm, prompts, params) -> dict:
    """Drive the engine by hand so every token's time is known."""
    engine = llm.engine
    meter = _UnionMeter(llm.model.hub)
    before = llm.expert_cache.stats()
    start = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    stamps: dict[str, list[float]] = {r: [] for r in rids}
    while engine.has_unfinished():
        res = engine.step()
        now = time.perf_counter()
        for out in res.outputs:
            stamps[out.request_id].extend([now] * len(out.new_token_ids))
    end = time.perf_counter()
    meter.close()
    after = llm.expert_cache.stats()
    tokens = sum(len(v) for v in stamps.values())
    firsts = [v[0] for v in stamps.values()]
    gaps = [b - a for v in stamps.values() for a, b in zip(v, v[1:])]
    return {"tok_s": tokens / (end - start),
            "decode_tok_s": (tokens - len(prompts)) / (end - min(firsts)),
            "experts_per_layer_step": meter.total / meter.events if meter.events else 0.0,
            "loads_per_token": (after["loads"] - before["loads"]) / tokens,
            "ttft_ms": 1e3 * statistics.mean(f - start for f in firsts),
            "tpot_p50_ms": 1e3 * float(np.percentile(gaps, 50)),
            "tpot_p99_ms": 1e3 * float(np.percentile(gaps, 99))}


def run_schedule_bench(args, model: str, policies: list[str], prompts, params, capacity_pct: int) -> tuple[list[dict], dict]:
    """Rows (one per policy and figure) and the run's settings."""
    from moe_rt.checkpoint import read_config
    from moe_rt.models.registry import parse_config
    from moe_rt_app import LLM

    slots = max(1, round(parse_config(read_config(model)).num_experts * capacity_pct / 100))
    llms = {}
    for p in policies:
        llm = LLM(model, dtype="float32", device="cpu", progress=False, max_num_seqs=args.concurrency,
                  scheduler_policy=p, expert_aware_batch=args.expert_aware_batch,
                  expert_aware_max_skips=args.expert_aware_max_skips,
                  cache=dict(offload="disk", capacity_slots=slots, policy="lru"))
        _one_run(llm, prompts[:2], params)  # warm-up: code paths, not the cache of the timed prompts
        llms[p] = llm
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for _ in range(args.repeats):
        for p in policies:  # interleaved: both sides see the same noise
            runs[p].append(_one_run(llms[p], prompts, params))
    sched = {p: llms[p].engine.moe_stats().get("scheduler") for p in policies}
    for llm in llms.values():
        llm.close()
    base = policies[0]
    rows = []
    for fig in FIGURES:
        b = statistics.median(r[fig] for r in runs[base])
        for p in policies:
            vals = [r[fig] for r in runs[p]]
            med = statistics.median(vals)
            rows.append({"figure": fig, "policy": p, "median": med,
                         "best": min(vals) if fig in LOWER_IS_BETTER else max(vals),
                         f"vs_{base}": med / b if b else None})
    extra = {"model": model, "concurrency": args.concurrency, "prompts": len(prompts),
             "max_tokens": params.max_tokens, "capacity": f"{capacity_pct}% (lru, disk)",
             "expert_aware_batch": args.expert_aware_batch or "fastest under measured costs",
             "expert_aware_max_skips": args.expert_aware_max_skips,
             "repeats": args.repeats, "scheduler_stats_last": sched}
    return rows, extra
