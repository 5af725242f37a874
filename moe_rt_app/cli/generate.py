"""`moe-rt generate` and `moe-rt chat`: one completion, printed as it comes, and a summary line."""
from __future__ import annotations

import argparse
import json
import sys
import time

from moe_rt_app.cli.flags import (add_ep_arguments, add_model_arguments, add_sampling_arguments, build_llm,
                                  check_expert_compute, config_from_args, sampling)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of as it comes")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (completion and summary) on stdout instead of text")
    add_ep_arguments(p, "run on N ranks: attention tensor-parallel, experts expert-parallel")


# -- the run summary ----------------------------------------------------------------------------
def summary(tokens: int, seconds: float, moe_stats: dict) -> dict:
    """Throughput plus the MoE figures of this run (engine.moe_stats(): cache, predictor, ep)."""
    out = {"tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None}
    cache, pred, ep = moe_stats.get("cache"), moe_stats.get("predictor"), moe_stats.get("ep")
    if cache:
        out["cache_hit_rate"] = cache["hit_rate"]
        out["cache_bytes_read"] = cache["bytes_moved_total"]
    if pred:
        out["predictor"] = pred["predictor"]
        out["predictor_recall"] = pred["recall"]
        out["predictor_top_k"] = pred["top_k"]
    if ep:
        out["ep_ranks"] = ep["ranks"]
        out["a2a_bytes_per_token"] = ep["a2a_bytes_per_token"]
    return out


def summary_line(s: dict) -> str:
    """One stderr line: `48 tokens in 1.20 s (40.0 tok/s); expert cache: ...`."""
    rate = f"{s['tokens_per_s']:.1f} tok/s" if s["tokens_per_s"] is not None else "- tok/s"
    parts = [f"{s['tokens']} tokens in {s['seconds']:.2f} s ({rate})"]
    if "cache_hit_rate" in s:
        parts.append(f"expert cache: {100 * s['cache_hit_rate']:.1f}% hits, "
                     f"{s['cache_bytes_read'] / 2**20:.1f} MiB read")
    if "predictor" in s:
        recall = "-" if s["predictor_recall"] is None else f"{s['predictor_recall']:.3f}"
        parts.append(f"predictor {s['predictor']}: live recall@{s['predictor_top_k']} {recall}")
    if "a2a_bytes_per_token" in s:
        parts.append(f"all-to-all over {s['ep_ranks']} ranks: {s['a2a_bytes_per_token']:,.0f} bytes/token")
    return "moe-rt: " + "; ".join(parts)


def report(out, stats: dict, as_json: bool) -> None:
    """After the completion: the summary on stderr, or everything as one JSON object on stdout."""
    if as_json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "summary": stats}))
    else:
        print(summary_line(stats), file=sys.stderr)


def generate_once(llm, prompt, params, stream: bool):
    """(RequestOutput, seconds): the completion, printed as it comes when `stream`."""
    start = time.perf_counter()
    if not stream:
        return llm.generate(prompt, params)[0], time.perf_counter() - start
    pieces = llm.stream(prompt, params)
    while True:
        try:
            print(next(pieces), end="", flush=True)
        except StopIteration as done:  # stream() returns the finished RequestOutput
            print()
            return done.value, time.perf_counter() - start


# -- generate ---------------------------------------------------------------------------------
def _ep_generate(ep, cfg, prompt, params):
    """One rank of `generate --ep N` (module level: the launcher pickles it). Rank 0 returns
    (RequestOutput, seconds, merged EP stats); every rank joins the stats all-gather."""
    from moe_rt_app.ep_llm import ep_llm_from_config

    llm = ep_llm_from_config(cfg, ep)
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]  # every rank takes the same steps
    seconds = time.perf_counter() - start
    stats = llm.moe_stats(group_view=True)  # a collective: every rank calls it
    return (out, seconds, stats) if ep.rank == 0 else None


def run_ep(args, cfg, params) -> int:
    from moe_rt.loader import load_spec
    from parallel.launch import launch
    from parallel.tp import check_attention_tp

    check_expert_compute(cfg.engine.expert_compute, cfg.device)
    check_attention_tp(load_spec(cfg.model).attention, cfg.parallel.ep)  # one line before any rank starts
    out, seconds, stats = launch(cfg.parallel.ep, _ep_generate, (cfg, args.prompt, params))[0]
    if not args.json:
        print(out.text)
    report(out, summary(len(out.token_ids), seconds, {"ep": stats}), args.json)
    return 0


def run(args) -> int:
    params = sampling(args)  # validate before loading the model
    cfg = config_from_args(args)
    if cfg.parallel.ep > 1:
        return run_ep(args, cfg, params)
    llm = build_llm(args, cfg)
    out, seconds = generate_once(llm, args.prompt, params, stream=not (args.no_stream or args.json))
    if args.no_stream and not args.json:
        print(out.text)
    report(out, summary(len(out.token_ids), seconds, llm.engine.moe_stats()), args.json)
    return 0


# -- chat ---------------------------------------------------------------------------------------
def chat_add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--message", required=True, help="the user's message")
    p.add_argument("--system", help="optional system message")
    add_model_arguments(p)
    add_sampling_arguments(p)


def chat_run(args) -> int:
    params = sampling(args)
    llm = build_llm(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}
    ]
    print(llm.chat(messages, params).text)
    return 0
