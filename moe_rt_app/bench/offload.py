"""`moe-rt bench offload`: decode tokens/s with experts offloaded to disk, per cache configuration.

Compared in one run, on the same prompts (greedy, so every configuration routes identically):
  resident   every expert in RAM (the ceiling);
  naive      no cache: every expert use reads it from disk (OnDemandExpertStore);
  lru        the cache at each capacity, demand loads only;
  pred+NAME  policy predictive with prefetch, for each predictor (gate_lookahead needs no
             training; frequency and coactivation are fitted on a trace of *other* prompts
             recorded in the same run).
  resident/intB, lru/intB  with --expert-bits: every expert resident and quantized (what the
             low-bit compute alone changes), and the LRU cache holding, moving and counting
             quantized experts (int8, or int4 in groups of --group-size); lru/intB's vs_lru and bytes_vs_lru
             are against the full-precision LRU row of the same capacity, and speed_target is
             the tok/s ratio that would pay back half the byte saving (1 + (1 - bytes_vs_lru) / 2).
  resident/plan, lru/plan  the same with a bits-plan file among --expert-bits (each expert at its
             planned width, through width pools: expert_cache/widths.py).
  lru+host   with --cpu-compute-on-miss (--tier cpu): the LRU cache whose misses may run on the
             host where their weights are (cpu_compute_on_miss auto or always) instead of loading.
Capacities are percentages of each layer's experts. With --scheduler-policy fcfs,expert_aware the
bench compares scheduling policies instead (offload_schedule.py). Experts are read from expert packs
(expert_cache/packs.py, written on first use) with O_DIRECT, which bypasses the page cache, so
figures are disk figures, not RAM ones; --no-pack reads the checkpoint's files instead, dropping
every page read from the page cache (slow_tier.DiskTier) unless --keep-page-cache. Every
configuration stays loaded and the timed runs are interleaved (one run of each per round), so a
busy patch of a shared machine slows all of them alike; per configuration: tok/s (median and
fastest run), ratios to resident, naive and LRU at the same capacity, bytes read and stall per
token, prefetches issued, used and wasted.

The cost model (cost_model.py) predicts each configuration's tokens/s from the resident layer
time, the measured per-expert disk read time, and miss/prefetch rates from replaying the decode
trace (simulator.py); its prediction is printed next to the measurement, followed by its
prediction for Mixtral-8x7B on a 24 GB GPU over PCIe 4.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from expert_cache import cost_model as cm
from moe_rt_app.bench.common import (add_model_choice, add_repeats, add_torch_threads, emit, parse_ints,
                                 repeat_stats, resolve_model)
from moe_rt_app.bench.decode import quantized_sides
from moe_rt_app.cli.args import non_negative_float
from moe_rt.errors import MoeRtError

ID_ONLY = ("frequency", "coactivation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_choice(p)
    p.add_argument("--capacities", default="25,50", help="cache sizes, percent of each layer's experts")
    p.add_argument("--predictors", default="gate_lookahead,frequency,coactivation",
                   help="predictors to prefetch with (policy predictive); empty for none")
    p.add_argument("--lookahead", default="1", help="prefetch depth: an integer or auto")
    p.add_argument("--expert-bits", default="",
                   help="also run the LRU cache with quantized experts at these widths and/or one "
                        "bits-plan file (e.g. 8,4,plan.yaml)")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128],
                   help="--expert-bits 4: input columns per scale")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--fit-prompts", type=int, default=16, help="prompts traced to fit id-only predictors")
    p.add_argument("--keep-page-cache", action="store_true",
                   help="do not drop read pages from the page cache (RAM then backs the 'disk' tier)")
    p.add_argument("--no-pack", action="store_true",
                   help="read experts from the safetensors files, not from expert packs (O_DIRECT)")
    p.add_argument("--prefetch-rules", default="cost",
                   help="prefetch_rule of the predictive configurations, comma-separated (cost, "
                        "always): one row per predictor and rule; rows of rule always are "
                        "labelled pred+NAME/always")
    p.add_argument("--cpu-compute-on-miss", choices=("auto", "always"), default=None,
                   help="add an lru+host row per capacity: the LRU cache with cpu_compute_on_miss set so "
                        "(needs --tier cpu)")
    p.add_argument("--copies-in-flight", type=int, default=2,
                   help="copies_in_flight of the predictive configurations: prefetch copies submitted to "
                        "the GPU at once, the rest cancellable in a host queue (>= 1)")
    p.add_argument("--prefetch-switches", default="measured",
                   help="prefetch_switch of the predictive configurations, comma-separated (measured, "
                        "on): one row per predictor, rule and switch; rows of switch on are "
                        "labelled .../on")
    p.add_argument("--prefetch-loads-budget", type=non_negative_float, default=1.1, metavar="X",
                   help="prefetch_loads_budget of the predictive configurations: most loads as a "
                        "multiple of a shadow LRU's on the same accesses (default 1.1; 0: none)")
    p.add_argument("--device", default="cpu", help="where the model and the fast tier live: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float16)")
    p.add_argument("--tier", choices=("disk", "cpu"), default="disk",
                   help="the slow tier: disk (expert packs or checkpoint files) or cpu (host RAM, pinned "
                        "on CUDA: the GPU-offload set-up, PCIe against GPU memory)")
    p.add_argument("--scope", choices=("per_layer", "global"), default="per_layer",
                   help="the caches' scope (global: one pool of capacity x layers slots)")
    p.add_argument("--plot", help="write a hit-rate-vs-capacity PNG from replaying the decode trace")
    p.add_argument("--scheduler-policy", default=None, metavar="fcfs,expert_aware",
                   help="compare scheduling policies instead of cache configurations: --concurrency sequences "
                        "running, the first of --capacities, fcfs as the baseline (offload_schedule.py)")
    p.add_argument("--concurrency", type=int, default=16, help="--scheduler-policy: sequences running at once")
    p.add_argument("--expert-aware-batch", type=int, default=None,
                   help="--scheduler-policy: sequences per expert_aware step (default: the fastest number, measured)")
    p.add_argument("--expert-aware-max-skips", type=int, default=3,
                   help="--scheduler-policy: steps an expert_aware sequence may wait in a row (default 3)")
    add_repeats(p, 3)
    add_torch_threads(p)
    p.add_argument("--no-progress", action="store_true")


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _decode_seconds(llm, prompts, max_tokens: int) -> float:
    from moe_rt_app.bench.decode import time_moe_rt

    return time_moe_rt(llm, prompts, max_tokens)


def _llm(model: str, args, cache=None, side: dict | None = None):
    """side: LLM options of a quantized side (bench.decode.quantized_sides), None for full precision."""
    from moe_rt_app import LLM

    return LLM(model, dtype=args.dtype, device=args.device, progress=False, cache=cache,
               **(side or {}))


def _disk_tier(llm, args):
    """The disk tier the cache configurations read from: packs (O_DIRECT; written on first use)
    unless --no-pack, else the checkpoint's files (page cache dropped unless --keep-page-cache)."""
    from expert_cache.packs import disk_tier
    from expert_cache.slow_tier import DiskTier

    spec, reader = llm.model.spec, llm.engine.reader
    if args.tier == "cpu":
        from expert_cache.slow_tier import HostTier

        return HostTier(reader, spec, llm.engine.dtype, pin=llm.engine.device.type == "cuda")
    if args.no_pack:
        return DiskTier(reader, spec, drop_page_cache=not args.keep_page_cache)
    return disk_tier(reader, spec, llm.engine.dtype, None)


def _disk_read_seconds(llm, drop: bool, n: int = 24, tier=None) -> float:
    """Seconds to read one expert from the checkpoint (or `tier`) into RAM (median of n
    distinct experts)."""
    from expert_cache.slow_tier import DiskTier

    spec = llm.model.spec
    if tier is None:
        tier = DiskTier(llm.engine.reader, spec, drop_page_cache=drop)
        if drop:
            tier.drop_all()
    D, I = spec.hidden_size, spec.moe.intermediate_size
    w13, w2 = torch.empty(2 * I, D, dtype=llm.engine.dtype), torch.empty(D, I, dtype=llm.engine.dtype)
    L, E = len(spec.moe_layer_ids), spec.num_experts
    times = []
    for i in range(n):
        t = time.perf_counter()
        tier.read_into((i % L, (i * 7) % E), w13, w2)
        times.append(time.perf_counter() - t)
    tier.close()
    return float(np.median(times))


def run(args: argparse.Namespace) -> int:
    from moe_rt import SamplingParams
    from moe_rt_app.cli.trace import record_trace
    from router_predict.trace import save_trace

    model = resolve_model(args)
    pcts = parse_ints(args.capacities, "--capacities")
    if any(p > 100 for p in pcts):
        raise MoeRtError("--capacities are percentages (1..100)")
    predictors = [p for p in args.predictors.split(",") if p]
    rules = [r for r in args.prefetch_rules.split(",") if r]
    if not rules or any(r not in ("cost", "always") for r in rules):
        raise MoeRtError("--prefetch-rules takes cost and/or always, comma-separated")
    switches = [w for w in args.prefetch_switches.split(",") if w]
    if not switches or any(w not in ("measured", "on") for w in switches):
        raise MoeRtError("--prefetch-switches takes measured and/or on, comma-separated")
    lookahead = args.lookahead if args.lookahead == "auto" else parse_ints(args.lookahead, "--lookahead")[0]
    if args.cpu_compute_on_miss and args.tier != "cpu":
        raise MoeRtError("--cpu-compute-on-miss needs --tier cpu (the weights must be in host RAM)")
    if args.copies_in_flight < 1:
        raise MoeRtError(f"--copies-in-flight must be >= 1, got {args.copies_in_flight}")
    sides = quantized_sides(args.expert_bits, args.group_size)  # "int8", "int4", "plan" -> LLM options
    progress = not args.no_progress
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    if args.scheduler_policy:
        return _schedule_bench(args, model, pcts[0], params)

    resident = _llm(model, args)
    spec = resident.model.spec
    L, E = len(spec.moe_layer_ids), spec.num_experts
    prompts = _prompts(args.batch, args.prompt_len, spec.vocab_size, seed=1)
    fit_prompts = _prompts(args.fit_prompts, args.prompt_len, spec.vocab_size, seed=2)
    _decode_seconds(resident, prompts, 2)  # warm-up
    eval_trace = record_trace(resident, prompts, params, with_hidden=True)
    fit_trace = record_trace(resident, fit_prompts, params)
    tmp = tempfile.TemporaryDirectory()
    fit_path = str(Path(tmp.name) / "fit.npz")
    save_trace(fit_path, fit_trace)
    t_read = _disk_read_seconds(resident, drop=not args.keep_page_cache)
    t_read_warm = _disk_read_seconds(resident, drop=False)
    tier = _disk_tier(resident, args)  # writes the pack now (once), not inside a timed run; --tier cpu: RAM
    t_read_tier = _disk_read_seconds(resident, drop=True, tier=tier)
    tier.close()

    configs = [("naive", None, None)]
    for pct in pcts:
        slots = max(1, round(E * pct / 100))
        configs.append(("lru", pct, dict(offload=args.tier, capacity_slots=slots, policy="lru")))
        if args.cpu_compute_on_miss:
            configs.append(("lru+host", pct, dict(offload="cpu", capacity_slots=slots, policy="lru",
                                                  cpu_compute_on_miss=args.cpu_compute_on_miss)))
        for name in sides:  # the same cache, quantized experts (the side read from the label)
            configs.append((f"lru/{name}", pct, dict(offload=args.tier, capacity_slots=slots, policy="lru")))
        for name in predictors:
            for rule in rules:
                for switch in switches:
                    cfg = dict(offload=args.tier, capacity_slots=slots, policy="predictive", predictor=name,
                               lookahead=lookahead, prefetch_rule=rule, prefetch_switch=switch,
                               copies_in_flight=args.copies_in_flight,
                               prefetch_loads_budget=args.prefetch_loads_budget or None)
                    if name in ID_ONLY:
                        cfg["predictor_dir"] = fit_path
                    label = (f"pred+{name}" + ("" if rule == "cost" else f"/{rule}")
                             + ("" if switch == "measured" else "/on"))
                    configs.append((label, pct, cfg))
    for _, _, cfg in configs:
        if cfg is not None:
            if args.tier == "disk":
                cfg["auto_pack"] = not args.no_pack
            if args.scope == "global":
                cfg.update(scope="global", capacity_slots=cfg["capacity_slots"] * L)
    tokens = args.batch * args.max_tokens
    runs = [_open_config(model, spec, label, pct, cfg, args, prompts, sides) for label, pct, cfg in
            tqdm(configs, desc="offload configs", disable=not progress)]
    res_run = dict(label="resident", pct=100, cfg=None, llm=resident, store=None)
    # every expert resident and quantized: how much of a quantized cache's gain is its compute
    res_runs = [res_run] + [dict(label=f"resident/{name}", pct=100, cfg=None, llm=_llm(model, args, side=side),
                                 store=None) for name, side in sides.items()]
    for r in res_runs[1:]:
        _decode_seconds(r["llm"], prompts, 2)  # warm-up
    _interleaved_repeats([*res_runs, *runs], prompts, args, progress)
    t_res = res_run["times"]
    rows = [dict(config=r["label"], capacity="100%", tok_s=tokens / r["times"].median,
                 tok_s_best=tokens / r["times"].best) for r in res_runs]
    for run_ in runs:
        row = _offload_row(run_, tokens, args)
        # the cost model knows full-precision reads only
        row["predicted_tok_s"] = None if _side(run_["label"]) else _predict(
            row, run_["cfg"], eval_trace, args, t_res.median, t_read if args.no_pack else t_read_tier, L, fit_trace)
        rows.append(row)
    resident_row, naive = rows[0], next(r for r in rows if r["config"] == "naive")
    for r in rows:  # ratios of medians, and of the fastest runs
        for base, name in ((resident_row, "vs_resident"), (naive, "vs_naive")):
            r[name], r[name + "_best"] = r["tok_s"] / base["tok_s"], r["tok_s_best"] / base["tok_s_best"]
    _ratios_to_lru(rows)
    extra = {"model": model, "batch": args.batch, "scope": args.scope, "max_tokens": args.max_tokens,
             "repeats": args.repeats,
             "disk_read_ms_per_expert": round(t_read * 1e3, 3),
             "page_cache_read_ms_per_expert": round(t_read_warm * 1e3, 3),
             "page_cache": "kept" if args.keep_page_cache else "dropped after each read",
             "device": args.device, "dtype": args.dtype,
             "expert_tier": ("host RAM" if args.tier == "cpu" else
                             "checkpoint files" if args.no_pack else "expert packs, O_DIRECT"),
             "tier_read_ms_per_expert": round(t_read_tier * 1e3, 3),
             "mixtral_8x7b_24gb_pcie4": _mixtral_table()}
    emit(rows, args, ["config", "capacity", "tok_s", "tok_s_best", "vs_resident", "vs_naive", "vs_lru",
                      "vs_lru_best", "hit_rate", "mb_per_token", "bytes_vs_lru", "speed_target",
                      "stall_ms_per_token",
                      "prefetches", "prefetch_hits", "wasted", "cancelled", "host_computed", "prediction_on",
                      "predicted_tok_s"],
         extra)
    if args.plot:
        _plot(eval_trace, args.plot, E, predictors, progress)
    tmp.cleanup()
    return 0


def _open_config(model, spec, label, pct, cfg, args, prompts, sides: dict) -> dict:
    """One configuration's LLM and expert store, warmed (prefill path, predictor), cache not
    reset. The naive one has no cache: every expert use reads the slow tier."""
    from expert_cache.on_demand import OnDemandExpertStore

    if cfg is None:
        tier = dict(offload="disk", auto_pack=not args.no_pack) if args.tier == "disk" else dict(offload="cpu")
        llm = _llm(model, args, dict(capacity_slots=1, policy="lru", **tier))
        llm.expert_cache.close()
        store = OnDemandExpertStore(spec, _disk_tier(llm, args), device=llm.engine.device,
                                    dtype=llm.engine.dtype)
        llm.model.moe_ctx.store = store
    else:
        side = _side(label)
        llm = _llm(model, args, cfg, sides[side] if side else None)  # a quantized pack is written here, untimed
        store = llm.expert_cache
    _decode_seconds(llm, prompts, 1)
    return dict(label=label, pct=pct, cfg=cfg, llm=llm, store=store)


def _side(label: str) -> str | None:
    """The quantized side of a configuration labelled lru/SIDE (intB or plan), else None."""
    head, _, side = label.partition("/")
    return side if head == "lru" and side else None


def _interleaved_repeats(runs: list[dict], prompts, args, progress: bool) -> None:
    """Time every configuration once per round, rounds repeated: on a shared machine a slow
    patch then hits all of them alike. Each run gets `times` (Repeats) and its store's stats
    before and after the timed runs; stores are closed at the end."""
    for r in runs:
        r["before"] = None if r["store"] is None else r["store"].stats()
        r["all"] = []
    for _ in tqdm(range(args.repeats), desc="rounds", disable=not progress):
        for r in runs:
            r["all"].append(_decode_seconds(r["llm"], prompts, args.max_tokens))
    for r in runs:
        r["times"] = repeat_stats(r["all"])
        if r["store"] is not None:
            r["after"] = r["store"].stats()
            r["store"].close()


def _offload_row(r: dict, tokens: int, args) -> dict:
    """A configuration's figures per timed run: tok/s (median, best), hit rate, bytes read and
    stall per token, prefetches issued / used (first hit) / wasted (evicted before any hit)."""
    b, s, cfg, n = r["before"], r["after"], r["cfg"], args.repeats
    delta = lambda k: (s.get(k, 0) - b.get(k, 0)) / n  # noqa: E731 - counters cover every repeat
    pct = r["pct"]
    return dict(config=r["label"], capacity=f"{pct}%" if pct else "0",
                tok_s=tokens / r["times"].median, tok_s_best=tokens / r["times"].best,
                hit_rate=None if cfg is None else _delta_rate(b, s),
                loads=delta("loads"), mb_per_token=delta("bytes_moved_total") / 1e6 / tokens,
                stall_ms_per_token=delta("stall_s") * 1e3 / tokens,
                prefetches=None if cfg is None else delta("prefetches_issued"),
                prefetch_hits=None if cfg is None else delta("prefetch_hits"),
                wasted=None if cfg is None else delta("wasted_prefetches"),
                cancelled=None if cfg is None else delta("prefetches_cancelled"),
                host_computed=None if cfg is None else delta("host_computed"),
                # share of layer visits with prediction on (prefetch_switch measured), timed runs only
                prediction_on=(delta("prefetch_on_visits") / delta("switch_visits")
                               if delta("switch_visits") else None),
                gb_moved=delta("bytes_moved_total") / 1e9, stall_s=delta("stall_s"))


def _ratios_to_lru(rows: list[dict]) -> None:
    """vs_lru (medians, and fastest runs) and bytes_vs_lru for each row of a capacity with an
    LRU row."""
    lru = {r["capacity"]: r for r in rows if r["config"] == "lru"}
    for r in rows:
        base = lru.get(r["capacity"])
        if base is None:
            continue
        r["vs_lru"] = r["tok_s"] / base["tok_s"]
        r["vs_lru_best"] = r["tok_s_best"] / base["tok_s_best"]
        r["bytes_vs_lru"] = r["mb_per_token"] / base["mb_per_token"] if base["mb_per_token"] else None
        if _side(r["config"]) and r["bytes_vs_lru"] is not None:  # #16: half the byte saving in tok/s
            r["speed_target"] = 1 + (1 - r["bytes_vs_lru"]) / 2


def _schedule_bench(args, model: str, pct: int, params) -> int:
    from moe_rt.checkpoint import read_config
    from moe_rt.models.registry import parse_config
    from moe_rt_app.bench.offload_schedule import parse_policies, run_schedule_bench

    policies = parse_policies(args.scheduler_policy)
    if policies[0] != "fcfs":
        policies.insert(0, "fcfs")  # the baseline every ratio is to
    vocab = parse_config(read_config(model)).vocab_size
    prompts = _prompts(args.concurrency, args.prompt_len, vocab, seed=1)
    rows, extra = run_schedule_bench(args, model, policies, prompts, params, pct)
    emit(rows, args, ["figure", "policy", "median", "best", "vs_fcfs"], extra)
    return 0


def _delta_rate(before: dict, after: dict) -> float:
    acc = after["accesses"] - before["accesses"]
    return (after["hits"] - before["hits"]) / acc if acc else 0.0


def _decode_rows(trace, prompt_len: int):
    return trace.take(np.nonzero(trace.positions >= prompt_len)[0])


def _predict(row, cfg, eval_trace, args, t_res, t_read, L, fit_trace) -> float:
    """The cost model's tokens/s for this configuration, with replay rates on the decode rows."""
    from expert_cache.simulator import BatchNeeds, SimOptions, predict_schedule, simulate

    trace = _decode_rows(eval_trace, args.prompt_len)
    needs = BatchNeeds.from_trace(trace)
    visits = needs.num_steps * L
    if cfg is None:
        misses, prefetches = sum(len(x) for s in needs.needs for x in s) / visits, 0.0
    else:
        schedule = None
        if cfg["policy"] == "predictive":
            depth = 1 if cfg["lookahead"] == "auto" else cfg["lookahead"]
            schedule = predict_schedule(trace, _replay_predictor(cfg["predictor"], eval_trace, fit_trace, depth),
                                        depth, progress=False)
        res = simulate(needs, SimOptions(cfg["policy"], cfg["capacity_slots"], cfg.get("scope", "per_layer"),
                                         prefetch_loads_budget=cfg.get("prefetch_loads_budget", 1.1)),
                       schedule)
        misses, prefetches = cm.rates_from_replay(res.stats.as_dict(), visits)
    layer_s = t_res / args.max_tokens / L
    expert_bytes = 1.0  # t_x is measured per expert: express the link in experts per second
    c = cm.CostInputs(L, layer_s, 0.0, 1, expert_bytes / t_read, misses, prefetches, args.batch)
    return cm.tokens_per_s(c)


def _replay_predictor(name, eval_trace, fit_trace, depth):
    from router_predict.registry import build_predictor
    from router_predict.predictors.gate_lookahead import GateLookaheadPredictor

    if name == "gate_lookahead":
        return GateLookaheadPredictor.from_checkpoint(eval_trace.meta.model)
    return build_predictor(name, fit_trace=fit_trace, depth=depth)


def _mixtral_table() -> list[dict]:
    """Cost-model predictions for Mixtral-8x7B, batch 1, at a few replay-like hit rates."""
    slots = cm.mixtral_capacity_slots()
    out = []
    for hit in (0.0, 0.5, 0.7, 0.9):
        misses = 2.0 * (1 - hit)  # two experts per token per layer
        demand = cm.tokens_per_s(cm.mixtral_inputs(misses))
        ahead = cm.tokens_per_s(cm.mixtral_inputs(0.0, prefetches_per_layer=misses))
        out.append({"hit_rate": hit, "capacity_experts": slots,
                    "tok_s_demand": round(demand, 2), "tok_s_all_misses_prefetched": round(ahead, 2),
                    "tok_s_all_resident_bound": round(cm.tokens_per_s(cm.mixtral_inputs(0.0)), 1)})
    return out


def _plot(trace, path: str, num_experts: int, predictors: list[str], progress: bool) -> None:
    from moe_rt_app.cli.simulate_cache import sweep_capacities
    from expert_cache.plots import plot_hit_rate_curve
    from expert_cache.simulator import hit_rate_curve, predict_schedule
    from router_predict.predictors.gate_lookahead import GateLookaheadPredictor

    schedule = None
    pols = ["lru", "lfu"]
    if "gate_lookahead" in predictors:
        schedule = predict_schedule(trace, GateLookaheadPredictor.from_checkpoint(trace.meta.model), 1,
                                    progress=progress)
        pols.append("predictive")
    curve = hit_rate_curve(trace, sweep_capacities(num_experts, num_experts // 4), pols,
                           schedule=schedule, progress=progress)
    plot_hit_rate_curve(curve, path, "replay of the benchmark's trace (predictive = gate_lookahead)")
