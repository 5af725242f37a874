"""The flags every model-running command shares (generate, chat, serve, trace and the ranks of
`--ep`), and the one translation from parsed flags to the config tree: `config_from_args`.

Precedence: a flag beats the config file (`--config` / `--placement`), which beats the defaults.
Offload flags override single fields of the file's cache section; an error names what the user
typed: the flag when a flag set the field, the YAML key when the file did (`named_flags`).
"""
from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager

from moe_rt.errors import MoeRtError
from moe_rt_app.cli.args import float_in, int_in, positive_float, positive_int, seed


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--config", help="config YAML: any of the sections engine, cache, predictor, parallel, "
                                    "expert_parallel, server (docs/placement.md); flags override it")
    p.add_argument("--placement", help="expert-placement YAML: the same file format as --config")
    p.add_argument("--expert-compute", default=None, choices=["torch", "loop", "triton", "reference"],
                   help="expert kernels: torch (grouped matmul; the default), loop (one matmul pair per "
                        "expert), triton (fused kernel; CUDA, or TRITON_INTERPRET=1 on CPU), reference (slow, dense)")
    p.add_argument("--expert-bits", type=bits_or_plan, metavar="{8,4,PLAN}",
                   help="quantize routed experts at load: 8 (int8 per row), 4 (int4 per group), or the "
                        "widths a bits-plan YAML gives each expert (moe-rt plan-bits); default: the compute "
                        "dtype (docs/quantization.md)")
    p.add_argument("--group-size", dest="expert_group_size", type=int, choices=[32, 64, 128],
                   help="int4 experts: input columns per scale and zero (default 64)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile: decode steps of one token (up to 8 with small experts, 32 in bfloat16) as one "
                        "compiled graph per layer, grouped-query or MLA attention (the first step of each "
                        "shape compiles it; serve compiles them all before it listens; docs/benchmarks.md)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="CUDA: replay decode steps from CUDA graphs captured per padded batch size "
                        "(prefill stays eager; docs/benchmarks.md)")
    add_offload_arguments(p)
    add_scheduling_arguments(p)


def bits_or_plan(text: str) -> int | str:
    """--expert-bits: 8 or 4 (one width for every expert), else the path of a bits plan."""
    if text.strip() in ("8", "4"):
        return int(text)
    if text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"takes 8, 4 or a bits-plan file, got {text}")
    return text  # the plan is read, and a missing file named, when the config is built


def add_scheduling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling and dynamic top-k (docs/scheduling.md)")
    g.add_argument("--scheduler-policy", choices=["fcfs", "expert_aware"], default=None,
                   help="fcfs: every running sequence decodes every step (the default); expert_aware: a subset "
                        "whose forecast experts overlap, so an expert cache loads fewer experts per step")
    g.add_argument("--expert-aware-batch", type=positive_int, default=None,
                   help="expert_aware: sequences decoded per step (default: the number that decodes the most tokens "
                        "per second, from measured step and expert-read times)")
    g.add_argument("--expert-aware-max-skips", type=positive_int, default=None,
                   help="expert_aware: a sequence left out this many steps in a row decodes next (default 3)")
    g.add_argument("--dynamic-topk-threshold", type=float_in(0, 1, hi_open=True), default=None,
                   help="drop routed choices whose normalised weight is below this (default 0: off)")
    g.add_argument("--dynamic-topk-top-p", type=float_in(0, 1, lo_open=True), default=None,
                   help="keep the fewest routed choices whose normalised weights reach this (default 1: off)")


def lookahead(text: str) -> int | str:
    return text if text == "auto" else int_in(1)(text)


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading (override the config file's cache section)")
    g.add_argument("--offload", choices=["none", "cpu", "disk"], help="where non-resident experts live")
    g.add_argument("--expert-cache-gb", type=positive_float, help="fast-tier budget in GiB of expert weights")
    g.add_argument("--expert-cache-slots", type=positive_int, help="fast-tier experts per MoE layer")
    g.add_argument("--cache-policy", choices=["lru", "lfu", "predictive"])
    g.add_argument("--lookahead", type=lookahead, help="MoE layers to prefetch ahead (an integer >= 1, or auto)")
    g = p.add_argument_group("the routing predictor (the config file's predictor section)")
    g.add_argument("--predictor", help="routing predictor: prefetches for --cache-policy predictive, and its "
                                       "live recall is reported")
    g.add_argument("--track-predictor", help="the same as --predictor (an older name)")
    g.add_argument("--predictor-dir", help="trained predictor folder, or the trace a frequency/coactivation "
                                           "predictor is fitted on")


def add_ep_arguments(p: argparse.ArgumentParser, ep_help: str) -> None:
    g = p.add_argument_group("expert parallelism (CPU: gloo on loopback; CUDA: nccl)")
    g.add_argument("--ep", type=positive_int, default=None, help=ep_help)
    from parallel.dispatchers import KINDS

    g.add_argument("--ep-dispatcher", choices=KINDS, default=None,
                   help="alltoall: DeepSpeed-MoE's scheme (the default); speculative: s-TS token shuffling")
    g.add_argument("--ep-predictor", help="s-TS predictor (default residual_gate; or gate_lookahead, ...): "
                                          "the predictor section under --ep-dispatcher speculative")


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


# Config field -> the flag that sets it, so an error names what the user typed.
ENGINE_FLAGS = {
    "max_num_seqs": "--max-num-seqs", "max_model_len": "--max-model-len",
    "kv_cache_memory_gb": "--kv-cache-memory-gb", "gpu_memory_utilization": "--gpu-memory-utilization",
    "expert_compute": "--expert-compute",
    "scheduler_policy": "--scheduler-policy", "expert_aware_batch": "--expert-aware-batch",
    "expert_aware_max_skips": "--expert-aware-max-skips", "dynamic_topk_threshold": "--dynamic-topk-threshold",
    "dynamic_topk_top_p": "--dynamic-topk-top-p",
    "expert_bits": "--expert-bits", "expert_group_size": "--group-size", "expert_bits_plan": "--expert-bits",
    "compile": "--compile", "cuda_graphs": "--cuda-graphs",
}
CACHE_FLAGS = {  # cache field -> (flag, args attribute)
    "offload": ("--offload", "offload"),
    "capacity_slots": ("--expert-cache-slots", "expert_cache_slots"),
    "capacity_gb": ("--expert-cache-gb", "expert_cache_gb"),
    "policy": ("--cache-policy", "cache_policy"),
    "lookahead": ("--lookahead", "lookahead"),
}
SERVER_FLAGS = {  # server field -> args attribute (the flag is the field's name, dashed)
    "host": "host", "port": "port", "served_model_name": "served_model_name", "api_key": "api_key",
    "max_queue": "max_queue", "max_body_bytes": "max_body_bytes", "log_level": "log_level",
    "log_stats_interval": "log_stats_interval",
}


def config_file(args) -> str | None:
    path, legacy = getattr(args, "config", None), getattr(args, "placement", None)
    if path and legacy and path != legacy:
        raise MoeRtError("--config and --placement name the same kind of file; give one")
    return path or legacy


def _file_sections(args) -> dict:
    from moe_rt_app.config import load_config_file

    path = config_file(args)
    return load_config_file(path) if path else {}


def flag_names(args) -> dict[str, str]:
    """{config field: flag} for the fields an error about this command line should call flags:
    every engine field, and a cache field unless the config file set it and no flag did."""
    try:
        from_file = set(_file_sections(args).get("cache") or {})
    except MoeRtError:  # the error being renamed may be that the file does not load
        from_file = set()
    cache = {f: flag for f, (flag, attr) in CACHE_FLAGS.items()
             if getattr(args, attr, None) is not None or f not in from_file}
    return {**ENGINE_FLAGS, **cache}


@contextmanager
def named_flags(args):
    """Re-raise a MoeRtError with config field names replaced by the flags that set them
    (`capacity_slots` -> `--expert-cache-slots`)."""
    try:
        yield
    except MoeRtError as e:
        names = {**flag_names(args), "ep": "--ep", "dispatcher": "--ep-dispatcher"}
        pattern = r"\b(?:engine\.|cache\.|parallel\.)?(" + "|".join(names) + r")\b"
        text = re.sub(r"^invalid option cache: ", "", str(e))
        renamed = re.sub(pattern, lambda m: names[m[1]], text)
        renamed = re.sub(r"^invalid option predictor\.(name|dir): ",
                         lambda m: "--predictor " if m[1] == "name" else "--predictor-dir ", renamed)
        raise MoeRtError(("offload flags: " + renamed) if text != str(e) else renamed) from None


def _predictor_name(args) -> str | None:
    names = {n for n in (getattr(args, "predictor", None), getattr(args, "track_predictor", None),
                         getattr(args, "ep_predictor", None)) if n}
    if len(names) > 1:
        raise MoeRtError(f"--predictor, --track-predictor and --ep-predictor name one predictor; got "
                         f"{', '.join(sorted(names))}")
    return names.pop() if names else None


def config_options(args) -> dict:
    """build_config keyword options from the flags of any model-running command (only the flags
    given: the config file and the defaults fill the rest)."""
    from moe_rt.checkpoint import default_model_dir

    opts: dict = {"model": args.model or default_model_dir(), "config": config_file(args)}
    doc = _file_sections(args)  # read once: flags override single fields of its sections
    for name in ("dtype", "device"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    for name in ENGINE_FLAGS:
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    bits = getattr(args, "expert_bits", None)
    if bits is not None:  # one flag for both fields: what it names replaces the file's either
        plan = isinstance(bits, str)
        opts["expert_bits"], opts["expert_bits_plan"] = (None, bits) if plan else (bits, None)
    cache = {f: getattr(args, attr) for f, (_, attr) in CACHE_FLAGS.items() if getattr(args, attr, None) is not None}
    if cache:
        opts["cache"] = {**(doc.get("cache") or {}), **cache}
    name = _predictor_name(args)
    if getattr(args, "predictor_dir", None) and not name:
        raise MoeRtError("--predictor-dir needs --predictor or --track-predictor")
    if name:
        base = doc.get("predictor") or {}
        opts["predictor"] = {**base, "name": name, **({"dir": args.predictor_dir} if args.predictor_dir else {})}
    parallel = {f: getattr(args, a) for f, a in (("ep", "ep"), ("dispatcher", "ep_dispatcher"))
                if getattr(args, a, None) is not None}
    if parallel:
        opts["parallel"] = {**(doc.get("parallel") or {}), **parallel}
    server = {f: getattr(args, a) for f, a in SERVER_FLAGS.items() if getattr(args, a, None) is not None}
    if getattr(args, "disable_docs", False):
        server["docs"] = False
    if getattr(args, "disable_access_log", False):
        server["access_log"] = False
    if server:
        opts["server"] = {**(doc.get("server") or {}), **server}
    return opts


def config_from_args(args):
    """The validated config tree the flags (over the config file) describe."""
    from moe_rt_app.config import build_config

    with named_flags(args):
        return build_config(**config_options(args))


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


def build_llm(args, cfg=None):
    """The LLM the flags describe (a progress bar on a terminal while it loads)."""
    from moe_rt_app.llm import LLM

    cfg = cfg or config_from_args(args)
    check_expert_compute(cfg.engine.expert_compute, cfg.device)
    with named_flags(args):
        return LLM.from_config(cfg, progress=sys.stderr.isatty())
