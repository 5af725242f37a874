"""`moe-rt bench ep`: expert-parallel traffic and latency, baseline vs s-TS vs s-EG vs both.

Starts N ranks itself (subprocesses, torch.distributed on loopback, or inside network namespaces
joined by rate-limited veth links with --slow-link), runs the same greedy prompts under every
scheme and reports, per generated or prompt token: bytes sent by all collectives and by the
all-to-alls alone, the share of token-expert pairs served locally, the predictor hit rate, the
mean engine-step latency (median and fastest of --repeats runs), and whether every scheme
produced identical tokens (lossless).

s-EG needs a placement: --placement FILE, or one planned here (parallel/grouping.py) from
routing recorded on calibration prompts that are not the benchmark prompts (or --trace FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from moe_rt_app.bench.common import add_model_choice, add_repeats, add_torch_threads, repeat_stats, resolve_model
from moe_rt.errors import MoeRtError

SCHEMES = {  # name -> (dispatcher, uses the s-EG placement)
    "baseline": ("alltoall", False),
    "s-TS": ("speculative", False),
    "s-EG": ("alltoall", True),
    "s-TS+s-EG": ("speculative", True),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_choice(p)  # synthetic mixtral-ep-tiny / mixtral-ep-small shard their heads over 2 and 4 ranks
    p.add_argument("--ranks", type=int, default=2, help="expert-parallel ranks N (default 2)")
    p.add_argument("--placement", help="s-EG placement YAML (default: plan one from calibration routing)")
    p.add_argument("--trace", help="routing trace (.npz) to plan the s-EG placement from")
    p.add_argument("--prompts", type=int, default=8, help="benchmark prompts (default 8)")
    p.add_argument("--prompt-len", type=int, default=48, help="tokens per prompt (default 48)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--predictor", default="gate_lookahead", help="s-TS predictor (router_predict name)")
    p.add_argument("--slow-link", type=float, metavar="GBIT",
                   help="run ranks in network namespaces with links limited to GBIT Gbit/s (needs root)")
    add_repeats(p, 3)
    add_torch_threads(p, 1, where=" per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schemes", default=",".join(SCHEMES),
                   help=f"comma-separated subset/order of {', '.join(SCHEMES)} (baseline is always run)")


def make_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def record_routing(model_dir: str, prompts, max_tokens: int):
    """[T, L, K] routing of a single-process run (the s-EG planner's input)."""
    import numpy as np

    from moe_rt_app import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", progress=False)
    hub = llm.engine.model.hub
    L = len(llm.engine.spec.moe_layer_ids)
    rows: list = []
    pending: dict[int, object] = {}

    def on_event(ev):
        pending[ev.moe_index] = ev.topk_ids.cpu().numpy()
        if len(pending) == L:
            rows.append(np.stack([pending[m] for m in range(L)], axis=1))
            pending.clear()

    unsubscribe = hub.subscribe(on_event)
    try:
        llm.generate(prompts, _params(max_tokens))
    finally:
        unsubscribe()
    return np.concatenate(rows, axis=0), llm.engine.spec.num_experts


def _params(max_tokens: int):
    from moe_rt.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


# -- the rank worker ---------------------------------------------------------------------------

def worker(job_path: str) -> None:
    """One rank: run every scheme on the same prompts; rank 0 writes the merged results."""
    import torch

    from parallel.groups import destroy_ep, init_ep
    from moe_rt_app.ep_llm import EPOptions, build_ep_llm

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    ep = init_ep("gloo", timeout_s=job["timeout_s"])
    try:
        llms = {}
        for name in job["schemes"]:
            dispatcher, grouped = SCHEMES[name]
            opts = EPOptions(dispatcher, job["placement"] if grouped else None, job["predictor"])
            llms[name] = build_ep_llm(job["model"], ep, opts, dtype="float32", kv_cache_memory_gb=0.25,
                                      max_num_seqs=len(job["prompts"]))
            llms[name].generate(job["warmup"], _params(2))  # first-call costs out of the timing
            llms[name].stats.reset()
        # Schemes take turns, repeat after repeat, so that load from other processes on the
        # machine hits them alike; the median and the fastest wall time are reported.
        walls: dict[str, list[float]] = {name: [] for name in llms}
        tokens = {}
        for _ in range(job["repeats"]):
            for name, llm in llms.items():
                ep_barrier(ep)
                t0 = time.perf_counter()
                outs = llm.generate(job["prompts"], _params(job["max_tokens"]))
                wall = time.perf_counter() - t0
                every: list = [None] * ep.world
                torch.distributed.all_gather_object(every, wall)
                walls[name].append(max(every))  # a step ends when its slowest rank ends
                tokens[name] = [o.outputs[0].token_ids for o in outs]
        results = {}
        for name, llm in llms.items():
            stats = llm.moe_stats(group_view=True)  # a collective: every rank calls it
            results[name] = {"tokens": tokens[name], "walls_s": walls[name], "stats": stats}
        if ep.is_main:
            Path(job["out"]).write_text(json.dumps(results))
    finally:
        destroy_ep(ep)


def ep_barrier(ep) -> None:
    import torch.distributed as dist

    if ep.world > 1:
        dist.barrier(group=ep.group)


# -- network namespaces for --slow-link ---------------------------------------------------------

class SlowLink:
    """N namespaces, each with one veth to a bridge namespace; tbf shapes both directions.

    Addresses 10.200.0.(r+1)/24 exist only inside these namespaces. Everything is deleted in
    close(), also after a failure (deleting a namespace removes its veth ends).
    """

    def __init__(self, ranks: int, gbit: float) -> None:
        self.tag = f"moert{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.names = [f"{self.tag}-r{r}" for r in range(ranks)]
        self.made: list[str] = []
        self.ranks, self.gbit = ranks, gbit

    def _ip(self, *args: str) -> None:
        import subprocess

        r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise MoeRtError(f"{' '.join(args)}: {r.stderr.strip() or 'failed'}")

    def open(self) -> "SlowLink":
        rate = f"{self.gbit * 1000:.3f}mbit"
        for ns in [self.bridge, *self.names]:
            self._ip("ip", "netns", "add", ns)
            self.made.append(ns)
        self._ip("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        self._ip("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for r, ns in enumerate(self.names):
            a, b = f"v{r}a", f"v{r}b"
            self._ip("ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", self.bridge)
            self._ip("ip", "-n", ns, "addr", "add", f"10.200.0.{r + 1}/24", "dev", a)
            self._ip("ip", "-n", ns, "link", "set", "lo", "up")
            self._ip("ip", "-n", ns, "link", "set", a, "up")
            self._ip("ip", "-n", self.bridge, "link", "set", b, "master", "br0", "up")
            for where, dev in ((ns, a), (self.bridge, b)):  # egress of each end = both directions
                self._ip("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", rate, "burst", "256kbit", "latency", "400ms")
        return self

    def prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[rank], "env", f"GLOO_SOCKET_IFNAME=v{rank}a"]

    def close(self) -> None:
        import subprocess

        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()


# -- the command -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from moe_rt.loader import load_spec
    from parallel.launch import launch_commands
    from moe_rt_app.config import load_expert_parallel
    from parallel.placement import save_placement_yaml
    from parallel.tp import check_attention_tp

    if args.ranks < 2:
        raise MoeRtError("bench ep needs at least 2 ranks")
    work = Path(tempfile.mkdtemp(prefix="moe-rt-bench-ep-"))
    model_dir = resolve_model(args)
    spec = load_spec(model_dir)
    # Heads must split over the ranks: refuse here, in one line, before any rank starts.
    check_attention_tp(spec.attention, args.ranks)
    prompts = make_prompts(spec.vocab_size, args.prompts, args.prompt_len, args.seed + 1)
    if args.placement:
        placement_path = args.placement
        load_expert_parallel(placement_path).validate_against(len(spec.moe_layer_ids), spec.num_experts)
    else:
        placement_path = str(work / "s-eg.yaml")
        save_placement_yaml(placement_path, plan_placement(args, model_dir, spec))
    schemes = [x.strip() for x in args.schemes.split(",") if x.strip()]
    unknown = [x for x in schemes if x not in SCHEMES]
    if unknown:
        raise MoeRtError(f"unknown scheme {unknown[0]!r}; choose from {', '.join(SCHEMES)}")
    if "baseline" not in schemes:
        schemes.insert(0, "baseline")
    job = {"model": model_dir, "schemes": schemes, "placement": placement_path,
           "predictor": args.predictor, "prompts": prompts, "max_tokens": args.max_tokens,
           "warmup": make_prompts(spec.vocab_size, 2, 8, args.seed + 2), "threads": args.torch_threads, "repeats": args.repeats,
           "timeout_s": 300, "out": str(work / "results.json")}
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    argv = [sys.executable, "-m", "moe_rt_app.bench.ep", "--worker", str(job_path)]
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    link = None
    try:
        if args.slow_link is not None:
            if args.slow_link <= 0:
                raise MoeRtError("--slow-link takes a positive rate in Gbit/s")
            try:
                link = SlowLink(args.ranks, args.slow_link).open()
            except MoeRtError as e:
                print(f"moe-rt: error: --slow-link needs network namespaces, which are not permitted "
                      f"here ({e})", file=sys.stderr)
                return 2
            procs = launch_commands(args.ranks, argv, addr="10.200.0.1", prefix=link.prefix, env=env, timeout_s=900)
        else:
            procs = launch_commands(args.ranks, argv, env=env, timeout_s=900)
    finally:
        if link is not None:
            link.close()
    bad = [(r, p) for r, p in enumerate(procs) if p.returncode]
    if bad:
        r, p = bad[0]
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoeRtError(f"bench rank {r} exited with {p.returncode}: {tail}")
    results = json.loads(Path(job["out"]).read_text())
    report = summarize(results, args, model_dir, placement_path)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["lossless"] else 1


def plan_placement(args, model_dir: str, spec):
    from parallel.grouping import GroupingOptions, plan_expert_groups

    if args.trace:
        from router_predict.trace import load_trace

        trace = load_trace(args.trace)
        ids, E = trace.topk_ids, trace.num_experts
    else:  # calibration prompts: same length, different seed from the benchmark prompts
        calib = make_prompts(spec.vocab_size, max(8, args.prompts), args.prompt_len, args.seed + 100)
        ids, E = record_routing(model_dir, calib, args.max_tokens)
    return plan_expert_groups(ids, E, GroupingOptions(ranks=args.ranks))


def summarize(results: dict, args, model_dir: str, placement: str) -> dict:
    base = results["baseline"]
    rows = {}
    for name, r in results.items():
        s, wall = r["stats"], repeat_stats(r["walls_s"])
        steps = s["steps"]
        rows[name] = {
            "all_bytes_per_token": s["all_bytes_per_token"], "a2a_bytes_per_token": s["a2a_bytes_per_token"],
            "bytes_by_collective": s["bytes_by_collective"], "local_share": s["local_share"],
            "predictor_hit_rate": s["predictor_hit_rate"], "steps": steps, "tokens": s["tokens"],
            # stats (and steps) cover every repeat; a wall time is one repeat's
            "step_ms": 1e3 * wall.median * len(r["walls_s"]) / steps if steps else None,
            "step_ms_best": 1e3 * wall.best * len(r["walls_s"]) / steps if steps else None,
            "same_tokens_as_baseline": r["tokens"] == base["tokens"],
        }
    first = rows["baseline"]
    for row in rows.values():  # every figure beside the baseline's
        for key in ("all_bytes_per_token", "a2a_bytes_per_token", "step_ms", "step_ms_best"):
            ratio_key = key.replace("_bytes_per_token", "") + "_vs_baseline"
            row[ratio_key] = row[key] / first[key] if row[key] and first[key] else None
    return {"model": model_dir, "ranks": args.ranks, "slow_link_gbit": args.slow_link,
            "placement": placement, "predictor": args.predictor, "prompts": args.prompts,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "lossless": all(r["same_tokens_as_baseline"] for r in rows.values()), "schemes": rows}


def format_report(rep: dict) -> str:
    link = f", links {rep['slow_link_gbit']} Gbit/s" if rep["slow_link_gbit"] else ", loopback"
    lines = [f"expert parallel over {rep['ranks']} ranks{link}; {rep['prompts']} prompts x "
             f"{rep['prompt_len']} tokens, {rep['max_tokens']} generated",
             f"{'scheme':<11} {'all B/tok':>10} {'vs base':>7} {'a2a B/tok':>10} {'vs base':>7} {'local':>6} "
             f"{'hit':>5} {'step ms':>8} {'vs base':>7} {'best':>8} {'vs base':>7}"]
    for name, r in rep["schemes"].items():
        hit = f"{r['predictor_hit_rate']:.2f}" if r["predictor_hit_rate"] is not None else "-"
        lines.append(f"{name:<11} {r['all_bytes_per_token']:>10.0f} {r['all_vs_baseline']:>7.3f} "
                     f"{r['a2a_bytes_per_token']:>10.0f} {r['a2a_vs_baseline']:>7.3f} {r['local_share']:>6.2f} "
                     f"{hit:>5} {r['step_ms']:>8.2f} {r['step_ms_vs_baseline']:>7.3f} {r['step_ms_best']:>8.2f} "
                     f"{r['step_ms_best_vs_baseline']:>7.3f}")
    lines.append("lossless: greedy tokens identical in every scheme" if rep["lossless"]
                 else "NOT LOSSLESS: some scheme produced different tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_rt_app.bench.ep --worker JOB` is how each rank starts (see run); any other
    arguments behave as `moe-rt bench ep`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1])
        return 0
    from moe_rt_app.cli.main import standalone

    return standalone("bench ep", argv)


if __name__ == "__main__":
    sys.exit(main())
