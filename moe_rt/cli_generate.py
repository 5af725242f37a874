"""`moe-rt generate` and `moe-rt chat`."""
from __future__ import annotations

import argparse
import sys

from moe_rt.errors import MoeRtError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--placement", help="expert-placement YAML (docs/placement.md)")
    p.add_argument("--expert-compute", default="torch", choices=["torch", "loop", "triton", "reference"])
    add_offload_arguments(p)


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading (override the placement file's cache section)")
    g.add_argument("--offload", choices=["none", "cpu", "disk"], help="where non-resident experts live")
    g.add_argument("--expert-cache-gb", type=float, help="fast-tier budget in GiB of expert weights")
    g.add_argument("--expert-cache-slots", type=int, help="fast-tier experts per MoE layer")
    g.add_argument("--cache-policy", choices=["lru", "lfu", "predictive"])
    g.add_argument("--predictor", help="routing predictor for prefetch (with --cache-policy predictive)")
    g.add_argument("--predictor-dir", help="folder of a trained predictor")
    g.add_argument("--lookahead", help="MoE layers to prefetch ahead (int or auto)")
    p.add_argument("--track-predictor", help="run this routing predictor online and report its live recall")


def cache_options(args) -> dict | None:
    """The cache section given by flags, or None when no offload flag was given."""
    fields = {
        "offload": args.offload, "capacity_gb": args.expert_cache_gb, "capacity_slots": args.expert_cache_slots,
        "policy": args.cache_policy, "predictor": args.predictor, "predictor_dir": args.predictor_dir,
        "lookahead": int(args.lookahead) if args.lookahead and args.lookahead.isdigit() else args.lookahead,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return None
    if args.placement:
        from moe_rt.placement import load_placement

        base = load_placement(args.placement).cache
        if base is not None:
            given = {**base.model_dump(), **given}
    from expert_cache.config import load_cache_config

    return load_cache_config(given, "offload flags")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of as it comes")
    g = p.add_argument_group("expert parallelism (CPU: gloo on loopback; CUDA: nccl)")
    g.add_argument("--ep", type=int, default=1, help="run on N ranks: attention tensor-parallel, experts expert-parallel")
    g.add_argument("--ep-dispatcher", choices=["alltoall", "speculative"], default="alltoall",
                   help="alltoall: DeepSpeed-MoE's scheme; speculative: s-TS token shuffling")
    g.add_argument("--ep-predictor", default="residual_gate", help="s-TS predictor (residual_gate, gate_lookahead, ...)")


def build_llm(args):
    from moe_rt.llm import LLM

    opts = dict(dtype=args.dtype, device=args.device, expert_compute=args.expert_compute)
    if args.placement:
        opts["placement"] = args.placement
    cache = cache_options(args)
    if cache is not None:
        opts["cache"] = cache
    if args.track_predictor:
        opts["predictor"] = args.track_predictor
        opts["predictor_dir"] = args.predictor_dir
    return LLM(args.model, progress=sys.stderr.isatty(), **opts)


def sampling(args):
    from moe_rt.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
    )


def _ep_generate(ep, model_dir, prompt, params, options, llm_options):
    """One rank of `generate --ep N` (module level: the launcher pickles it)."""
    from parallel.runtime import build_ep_llm

    llm = build_ep_llm(model_dir, ep, options, **llm_options)
    text = llm.generate(prompt, params)[0].text  # every rank takes the same steps
    return text if ep.rank == 0 else None


def run_ep(args, params) -> int:
    from moe_rt.llm import default_model_dir
    from parallel.launch import launch
    from parallel.runtime import EPOptions

    if args.offload or args.expert_cache_slots or args.expert_cache_gb:
        raise MoeRtError("--ep does not combine with expert offloading yet")
    from moe_rt.loader import load_spec
    from parallel.tp import check_attention_tp

    model = args.model or default_model_dir()
    check_attention_tp(load_spec(model).attention, args.ep)  # refuse in one line before any rank starts
    options = EPOptions(dispatcher=args.ep_dispatcher, placement=args.placement, predictor=args.ep_predictor)
    llm_options = dict(dtype=args.dtype, expert_compute=args.expert_compute)
    texts = launch(args.ep, _ep_generate, (model, args.prompt, params, options, llm_options))
    print(texts[0])
    return 0


def run(args) -> int:
    params = sampling(args)  # validate before loading the model
    if args.ep < 1:
        raise MoeRtError(f"--ep must be >= 1, got {args.ep}")
    if args.ep > 1:
        return run_ep(args, params)
    llm = build_llm(args)
    if args.no_stream:
        print(llm.generate(args.prompt, params)[0].text)
    else:
        for piece in llm.stream(args.prompt, params):
            print(piece, end="", flush=True)
        print()
    return 0


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
