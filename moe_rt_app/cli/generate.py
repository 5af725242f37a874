"""`moe-rt generate` and `moe-rt chat`, and the rule every model-running command (serve, trace)
shares for turning flags into `LLM` options: llm_options(), build_llm(), named_flags()."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from moe_rt_app.cli.args import float_in, int_in, positive_float, positive_int, seed
from moe_rt.errors import MoeRtError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--placement", help="expert-placement YAML (docs/placement.md)")
    p.add_argument("--expert-compute", default="torch", choices=["torch", "loop", "triton", "reference"],
                   help="expert kernels: torch (grouped matmul), loop (one matmul pair per expert), "
                        "triton (fused kernel; CUDA, or TRITON_INTERPRET=1 on CPU), reference (slow, dense)")
    add_offload_arguments(p)


def lookahead(text: str) -> int | str:
    return text if text == "auto" else int_in(1)(text)


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading (override the placement file's cache section)")
    g.add_argument("--offload", choices=["none", "cpu", "disk"], help="where non-resident experts live")
    g.add_argument("--expert-cache-gb", type=positive_float, help="fast-tier budget in GiB of expert weights")
    g.add_argument("--expert-cache-slots", type=positive_int, help="fast-tier experts per MoE layer")
    g.add_argument("--cache-policy", choices=["lru", "lfu", "predictive"])
    g.add_argument("--predictor", help="routing predictor for prefetch (with --cache-policy predictive)")
    g.add_argument("--predictor-dir", help="folder (or fit trace) of the predictor given by --predictor or "
                                           "--track-predictor")
    g.add_argument("--lookahead", type=lookahead, help="MoE layers to prefetch ahead (an integer >= 1, or auto)")
    p.add_argument("--track-predictor", help="run this routing predictor online and report its live recall")


# Config field -> the flag that sets it, so an error names what the user typed. Engine fields come
# only from flags; a cache field keeps its YAML name when the placement file set it and no flag did.
ENGINE_FLAGS = {
    "max_num_seqs": "--max-num-seqs", "max_model_len": "--max-model-len",
    "kv_cache_memory_gb": "--kv-cache-memory-gb", "expert_compute": "--expert-compute",
}
CACHE_FLAGS = {  # field -> (flag, args attribute)
    "capacity_slots": ("--expert-cache-slots", "expert_cache_slots"),
    "capacity_gb": ("--expert-cache-gb", "expert_cache_gb"),
    "predictor_dir": ("--predictor-dir", "predictor_dir"),
    "lookahead": ("--lookahead", "lookahead"),
}


def flag_names(args) -> dict[str, str]:
    """{config field: flag} for the fields an error about this command line should call flags."""
    from_file = _placement_cache_keys(args.placement) if getattr(args, "placement", None) else set()
    cache = {f: flag for f, (flag, attr) in CACHE_FLAGS.items()
             if getattr(args, attr, None) is not None or f not in from_file}
    return {**ENGINE_FLAGS, **cache}


def _placement_cache_keys(path: str) -> set[str]:
    """The keys of the placement file's cache section, read as plain YAML: the error being
    renamed may be that the file does not validate."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    cache = doc.get("cache") if isinstance(doc, dict) else None
    return set(cache) if isinstance(cache, dict) else set()


@contextmanager
def named_flags(args):
    """Re-raise a MoeRtError with config field names replaced by the flags that set them
    (`capacity_slots` -> `--expert-cache-slots`)."""
    try:
        yield
    except MoeRtError as e:
        names = flag_names(args)
        pattern = r"\b(?:engine\.|cache\.)?(" + "|".join(names) + r")\b"
        raise MoeRtError(re.sub(pattern, lambda m: names[m[1]], str(e))) from None


def cache_options(args):
    """The CacheConfig given by flags (over the placement file's cache section), or None when no
    offload flag was given."""
    fields = {
        "offload": args.offload, "capacity_gb": args.expert_cache_gb, "capacity_slots": args.expert_cache_slots,
        "policy": args.cache_policy, "predictor": args.predictor, "lookahead": args.lookahead,
        # --predictor-dir serves --track-predictor too: it is the cache's only with --predictor
        "predictor_dir": args.predictor_dir if args.predictor else None,
    }
    if args.predictor_dir and not (args.predictor or args.track_predictor):
        raise MoeRtError("--predictor-dir needs --predictor or --track-predictor")
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return None
    from expert_cache.config import load_cache_config

    with named_flags(args):
        if args.placement:
            from moe_rt_app.placement_file import load_placement

            base = load_placement(args.placement).cache
            if base is not None:
                given = {**base.model_dump(), **given}
        return load_cache_config(given, "offload flags")


def check_expert_compute(name: str, device: str) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU ones only under TRITON_INTERPRET=1: say so
    before loading anything rather than fail in the first forward pass."""
    if name != "triton":
        return
    from moe_rt.device import resolve_device

    try:
        from moe_rt.kernels.fused_moe import interpret_mode
    except ImportError as e:
        raise MoeRtError(f"--expert-compute triton is unavailable: {e}") from None
    if resolve_device(device).type != "cuda" and not interpret_mode():
        raise MoeRtError("--expert-compute triton needs a CUDA device (or TRITON_INTERPRET=1 to run its "
                         "kernels on the CPU); use --expert-compute torch")


def llm_options(args) -> dict:
    """`LLM(...)` keyword options from the model, offload and engine flags of any command."""
    opts = dict(dtype=args.dtype, device=args.device, expert_compute=args.expert_compute)
    if args.placement:
        opts["placement"] = args.placement
    for name in ENGINE_FLAGS:
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    cache = cache_options(args)
    if cache is not None:
        opts["cache"] = cache
    if args.track_predictor:
        opts["predictor"] = args.track_predictor
        opts["predictor_dir"] = args.predictor_dir
    return opts


def build_llm(args, **extra):
    """The LLM the flags describe (a progress bar on a terminal while it loads)."""
    from moe_rt_app.llm import LLM

    check_expert_compute(args.expert_compute, args.device)
    with named_flags(args):
        return LLM(args.model, progress=sys.stderr.isatty(), **llm_options(args), **extra)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float_in(0, 2), default=0.8, help="0 = greedy; at most 2")
    g.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=0.95, help="nucleus mass in (0, 1]")
    g.add_argument("--top-k", type=int_in(-1), default=0, help="0 or -1: no top-k cut")
    g.add_argument("--min-p", type=float_in(0, 1), help="drop tokens below min-p times the top token's probability")
    g.add_argument("--repetition-penalty", type=positive_float,
                   help="> 0; divides the logits of tokens already in the prompt or output (1 = off)")
    g.add_argument("--presence-penalty", type=float_in(-2, 2), help="in [-2, 2]: penalise tokens already generated")
    g.add_argument("--frequency-penalty", type=float_in(-2, 2), help="in [-2, 2]: penalise by generated count")
    g.add_argument("--seed", type=seed, help="per-request seed (64-bit)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


OPTIONAL_SAMPLING = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling(args):
    from moe_rt.sampling_params import SamplingParams

    given = {k: getattr(args, k) for k in OPTIONAL_SAMPLING if getattr(args, k) is not None}
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, **given,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of as it comes")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (completion and summary) on stdout instead of text")
    add_ep_arguments(p, "run on N ranks: attention tensor-parallel, experts expert-parallel")


def add_ep_arguments(p: argparse.ArgumentParser, ep_help: str) -> None:
    g = p.add_argument_group("expert parallelism (CPU: gloo on loopback; CUDA: nccl)")
    g.add_argument("--ep", type=positive_int, default=1, help=ep_help)
    g.add_argument("--ep-dispatcher", choices=["alltoall", "speculative"], default="alltoall",
                   help="alltoall: DeepSpeed-MoE's scheme; speculative: s-TS token shuffling")
    g.add_argument("--ep-predictor", default="residual_gate", help="s-TS predictor (residual_gate, gate_lookahead, ...)")


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
def _ep_generate(ep, model_dir, prompt, params, options, llm_options):
    """One rank of `generate --ep N` (module level: the launcher pickles it). Rank 0 returns
    (RequestOutput, seconds, merged EP stats); every rank joins the stats all-gather."""
    from moe_rt_app.ep_llm import build_ep_llm

    llm = build_ep_llm(model_dir, ep, options, **llm_options)
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]  # every rank takes the same steps
    seconds = time.perf_counter() - start
    stats = llm.moe_stats(group_view=True)  # a collective: every rank calls it
    return (out, seconds, stats) if ep.rank == 0 else None


def run_ep(args, params) -> int:
    from moe_rt.checkpoint import default_model_dir
    from parallel.launch import launch
    from moe_rt_app.ep_llm import EPOptions

    if args.offload or args.expert_cache_slots or args.expert_cache_gb:
        raise MoeRtError("--ep does not combine with expert offloading yet")
    from moe_rt.loader import load_spec
    from parallel.tp import check_attention_tp

    model = args.model or default_model_dir()
    check_expert_compute(args.expert_compute, args.device)
    check_attention_tp(load_spec(model).attention, args.ep)  # refuse in one line before any rank starts
    options = EPOptions(dispatcher=args.ep_dispatcher, placement=args.placement, predictor=args.ep_predictor)
    llm_options = dict(dtype=args.dtype, expert_compute=args.expert_compute)
    out, seconds, stats = launch(args.ep, _ep_generate, (model, args.prompt, params, options, llm_options))[0]
    if not args.json:
        print(out.text)
    report(out, summary(len(out.token_ids), seconds, {"ep": stats}), args.json)
    return 0


def run(args) -> int:
    params = sampling(args)  # validate before loading the model
    if args.ep > 1:
        return run_ep(args, params)
    llm = build_llm(args)
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
