"""`moe-rt serve`: the OpenAI-compatible HTTP server (docs/server.md).

The socket is bound first and the model loads on the engine thread, so /health answers 503 while
the model loads and 200 once it serves. Also runnable as `python -m server.cli_serve ...`.
With `--ep N` (N > 1) the model runs expert-parallel on N local ranks; rank 0 serves HTTP
(parallel/serve_ep.py, docs/server.md "Expert-parallel serving").
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path

from moe_rt.errors import MoeRtError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    parser.add_argument("--placement", default=None, help="expert-placement YAML file (docs/placement.md)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one, printed at start)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait for a first token; more get 429")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (413 beyond)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together at most")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None, help="memory for the paged KV cache")
    from moe_rt.cli_generate import add_offload_arguments

    add_offload_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = parser.add_argument_group("expert parallelism (CPU: gloo on loopback; CUDA: nccl)")
    g.add_argument("--ep", type=int, default=1, help="run on N local ranks: rank 0 serves HTTP, every rank computes")
    g.add_argument("--ep-dispatcher", choices=["alltoall", "speculative"], default="alltoall",
                   help="alltoall: DeepSpeed-MoE's scheme; speculative: s-TS token shuffling")
    g.add_argument("--ep-predictor", default="residual_gate", help="s-TS predictor (residual_gate, gate_lookahead, ...)")


def _engine_options(args: argparse.Namespace) -> dict:
    opts = {"dtype": args.dtype, "device": args.device, "placement": args.placement}
    for name in ("max_num_seqs", "max_model_len", "kv_cache_memory_gb"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.track_predictor:
        opts["predictor"], opts["predictor_dir"] = args.track_predictor, args.predictor_dir
    from moe_rt.cli_generate import cache_options

    cache = cache_options(args)
    if cache is not None:
        opts["cache"] = cache
    return opts


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so /health answers at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MoeRtError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def make_server(app, args: argparse.Namespace):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=False))


def announce_ready(engine, what: str = "") -> threading.Thread:
    """Print one 'ready' line once the engine serves (scripts and tests wait for it instead of
    polling /health). Gives up silently if the model fails to load (a daemon: it never holds the
    process up)."""
    def watch() -> None:
        while not engine.wait_for(lambda s: s.ready, 1.0):  # the load failure path does not notify
            if engine.error is not None:
                return
        print(f"moe-rt: ready{what}", flush=True)

    t = threading.Thread(target=watch, name="moe-rt-ready", daemon=True)
    t.start()
    return t


def run(args: argparse.Namespace) -> int:
    from moe_rt.config import build_config
    from moe_rt.engine.llm_engine import LLMEngine
    from moe_rt.llm import default_model_dir

    from .app import build_app
    from .async_engine import AsyncEngine

    # Check everything cheap before binding the port: a bad flag fails fast with one line.
    if args.ep < 1:
        raise MoeRtError(f"--ep must be >= 1, got {args.ep}")
    model = args.model if args.model is not None else default_model_dir()
    if not (Path(model) / "config.json").is_file():
        raise MoeRtError(f"{model} is not a model folder (no config.json)")
    cfg = build_config(model=model, **_engine_options(args))
    name = args.served_model_name or Path(model).resolve().name
    if args.ep > 1:
        from parallel.serve_ep import check_group

        if cfg.cache is not None or cfg.predictor:
            raise MoeRtError("--ep does not combine with expert offloading or --track-predictor yet")
        check_group(model, args)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"moe-rt: serving '{name}' on http://{host}:{port}/v1 (health: /health, metrics: /metrics)", flush=True)
    if args.ep > 1:
        from parallel.serve_ep_launch import run_group

        args.model, args.served_model_name = model, name
        return run_group(args, sock)
    engine = AsyncEngine(lambda: LLMEngine(cfg, progress=False), max_queue=args.max_queue)
    app = build_app(engine, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    announce_ready(engine)
    make_server(app, args).run(sockets=[sock])
    return 1 if engine.error else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-rt serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled after a clean shutdown
        return 0
    except MoeRtError as e:
        print(f"moe-rt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
