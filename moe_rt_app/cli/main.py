"""`moe-rt` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported, so a command
never pays for another's imports.

Exit codes and stderr: a user error (a bad flag, a bad model folder: MoeRtError) prints one line
`moe-rt: error: ...` and exits 2; anything else is a bug and prints one line with a hint (exit 1),
or its traceback when MOE_RT_DEBUG=1. A closed stdout (`moe-rt info | head -1`) ends quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from moe_rt_app.cli.args import make_output_folders
from moe_rt.errors import MoeRtError
from moe_rt.version import version

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("moe_rt_app.cli.generate", "generate a completion for a prompt"),
    "chat": ("moe_rt_app.cli.generate:chat", "answer one chat message with the model's chat template"),
    "info": ("moe_rt_app.cli.info", "architecture, parameter counts and expert sizes of a model folder"),
    "serve": ("moe_rt_app.cli.serve", "start the OpenAI-compatible REST server"),
    "trace": ("moe_rt_app.cli.trace", "record a routing trace (.npz) by running prompts"),
    "train-predictor": ("moe_rt_app.cli.train_predictor", "train a learned routing predictor on a trace"),
    "eval-predictor": ("moe_rt_app.cli.eval_predictor", "replay a trace and score routing predictors"),
    "simulate-cache": ("moe_rt_app.cli.simulate_cache", "replay a trace through expert-cache policies"),
    "pack-experts": ("moe_rt_app.cli.pack_experts", "write a model's experts as aligned packs for the disk tier"),
    "plan-placement": ("moe_rt_app.cli.plan_placement", "plan expert-to-rank placement from a trace (s-EG)"),
    "simulate-ep": ("moe_rt_app.cli.simulate_ep", "predict expert-parallel traffic for many ranks from a trace"),
    "plan-bits": ("moe_rt_app.cli.plan_bits", "write a per-expert bitwidth plan from a trace (hot experts wider)"),
    "eval-ppl": ("moe_rt_app.cli.eval_ppl", "perplexity over a text file; with --expert-bits 8|4|PLAN, quantized vs full"),
    "version": ("moe_rt_app.cli.main:version", "print the version of moe-rt (also: moe-rt --version)"),
    "bench": ("", "benchmarks: " + ", ".join(["decode", "kernel", "serve", "offload", "ep"])),
}
BENCHES: dict[str, tuple[str, str]] = {
    "decode": ("moe_rt_app.bench.decode", "decode tokens/s of moe-rt vs transformers on the same weights"),
    "kernel": ("moe_rt_app.bench.kernel", "fused Triton MoE vs per-expert loop vs bandwidth floor"),
    "serve": ("moe_rt_app.bench.serve", "load test of the REST server vs offline throughput"),
    "offload": ("moe_rt_app.bench.offload", "decode with experts offloaded: cache policies vs resident"),
    "ep": ("moe_rt_app.bench.ep", "expert-parallel traffic and latency: baseline vs s-TS vs s-EG"),
}


DEBUG_ENV = "MOE_RT_DEBUG"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would add a usage block)
        # "argument --port: must be in 0..65535, got 70000" -> "--port must be in 0..65535, got 70000"
        message = re.sub(r"^argument (?:\S+/)?(\S+): ", r"\1 ", message)
        print(f"moe-rt: error: {message}", file=sys.stderr)
        sys.exit(2)


def version_add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def version_run(args: argparse.Namespace) -> int:
    print(f"moe-rt {version()}")
    return 0


def one_line(message: str) -> str:
    """Errors are one line: a multi-line message (some libraries write those) is joined."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _load(spec: str):
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise MoeRtError(f"this command needs {e.name}, which is not installed") from None
    if attr:
        return getattr(mod, f"{attr}_add_arguments"), getattr(mod, f"{attr}_run")
    return mod.add_arguments, mod.run


def _usage(table: dict, prog: str) -> str:
    lines = [f"usage: {prog} COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in table.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, table = "moe-rt", COMMANDS
    if argv[:1] in (["--version"], ["-V"]):
        argv = ["version"]
    if argv and argv[0] == "bench":
        prog, table, argv = "moe-rt bench", BENCHES, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(table, prog))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"moe-rt: error: unknown command '{name}' (choose from {', '.join(table)})", file=sys.stderr)
        return 2
    try:
        add_arguments, run = _load(table[name][0])
        parser = _Parser(prog=f"{prog} {name}", description=table[name][1])
        add_arguments(parser)
        try:
            args = parser.parse_args(rest)
        except SystemExit as e:  # --help (0), or a usage error already printed (2)
            return e.code if isinstance(e.code, int) else 2
        make_output_folders(parser, args)
        code = int(run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except MoeRtError as e:
        print(f"moe-rt: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Python flushes stdout again at exit,
        # so point it at /dev/null first (the recipe of the `signal` module's documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # a bug, not a user error: one line unless asked for the traceback
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"moe-rt: error: {type(e).__name__}: {one_line(e)} (unexpected; rerun with {DEBUG_ENV}=1 "
              f"for the traceback)", file=sys.stderr)
        return 1


def standalone(command: str, argv: list[str] | None = None) -> int:
    """`python -m some.module ARGS` == `moe-rt COMMAND ARGS`: one parser and one error path."""
    return main([*command.split(), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
