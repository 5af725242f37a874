"""`moe-rt generate` and `moe-rt chat`."""
from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--placement", help="expert-placement YAML (docs/placement.md)")
    p.add_argument("--expert-compute", default="torch", choices=["torch", "triton", "reference"])


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


def build_llm(args):
    from moe_rt.llm import LLM

    opts = dict(dtype=args.dtype, device=args.device, expert_compute=args.expert_compute)
    if args.placement:
        opts["placement"] = args.placement
    return LLM(args.model, progress=sys.stderr.isatty(), **opts)


def sampling(args):
    from moe_rt.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
    )


def run(args) -> int:
    params = sampling(args)  # validate before loading the model
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
