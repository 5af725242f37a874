"""`moe-rt serve`: the OpenAI-compatible HTTP server (docs/server.md).

Start-up fails fast: anything wrong with the flags, the model folder (config, weights,
tokenizer), the placement, dtype or device ends the command with one line on stderr and exit 2,
before the "serving" line and before anything listens. The order:
  1. flags are parsed and range-checked (moe_rt_app/cli/args.py);
  2. the port is reserved: bound but not listening, so a port in use fails before the model loads;
  3. the LLMEngine is built in this thread (a progress bar on a terminal);
  4. the socket listens, "moe-rt: serving ... on URL" is printed and uvicorn serves the built
     engine; "moe-rt: ready" follows once the engine loop runs.
If the engine thread dies while serving, uvicorn is stopped and the command exits with 1.

Also runnable as `python -m moe_rt_app.cli.serve ...`. With `--ep N` (N > 1) the model runs
expert-parallel on N local ranks; rank 0 serves HTTP (moe_rt_app/cli/serve_ep.py, docs/server.md
"Expert-parallel serving").
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from moe_rt_app.cli.args import float_in, int_in, non_negative_float, port, positive_float, positive_int
from moe_rt.errors import MoeRtError


def api_key(text: str) -> str:
    from server.config import API_KEY_RULE, valid_api_key

    if not valid_api_key(text):
        raise argparse.ArgumentTypeError(API_KEY_RULE)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moe_rt_app.cli.flags import add_ep_arguments, add_model_arguments

    add_model_arguments(parser)  # --model, --dtype, --device, --placement, --expert-compute, offload
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=None, help="TCP port (default 8000; 0: a free one, printed at start)")
    parser.add_argument("--api-key", type=api_key, default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max-queue", type=positive_int, default=None,
                        help="requests allowed to wait for a first token; more get 429 (default 256)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=None,
                        help="largest request body (413 beyond; default 4 MiB)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=None, help="sequences decoded together at most")
    parser.add_argument("--max-model-len", type=int_in(2), default=None, help="context length (prompt + output)")
    parser.add_argument("--kv-cache-memory-gb", type=positive_float, default=None,
                        help="memory for the paged KV cache (default: 1 GiB on CPU; on CUDA what "
                             "--gpu-memory-utilization leaves after the weights and the expert cache)")
    parser.add_argument("--gpu-memory-utilization", type=float_in(0, 1, lo_open=True), default=None,
                        help="CUDA: fraction of the GPU's memory the engine may fill (default 0.9)")
    parser.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"],
                        help="default info")
    parser.add_argument("--disable-docs", action="store_true", help="serve no OpenAPI schema and no /docs page")
    parser.add_argument("--disable-access-log", action="store_true", help="log no line per request")
    parser.add_argument("--log-stats-interval", type=non_negative_float, default=None, metavar="SECONDS",
                        help="log a throughput line this often (0: never; default 10)")
    add_ep_arguments(parser, "run on N local ranks: rank 0 serves HTTP, every rank computes")


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to host:port but not listening yet: the port is ours (a second server fails
    here at once), while clients get 'connection refused' until the model is loaded."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, no such address, a privileged port
        sock.close()
        raise MoeRtError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serving_line(name: str, sock: socket.socket, docs: bool) -> str:
    host, port_ = sock.getsockname()[:2]
    extra = ", docs: /docs" if docs else ""
    return f"moe-rt: serving '{name}' on http://{host}:{port_}/v1 (health: /health, metrics: /metrics{extra})"


def make_server(app, server_cfg):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=server_cfg.log_level, timeout_graceful_shutdown=5,
                                         access_log=False))


def announce_ready(engine, what: str = "") -> threading.Thread:
    """Print one 'ready' line once the engine serves (scripts and tests wait for it instead of
    polling /health). Gives up silently if the engine fails first (a daemon: it never holds the
    process up)."""
    def watch() -> None:
        while not engine.wait_for(lambda s: s.ready, 1.0):  # the failure path does not notify
            if engine.error is not None:
                return
        print(f"moe-rt: ready{what}", flush=True)

    t = threading.Thread(target=watch, name="moe-rt-ready", daemon=True)
    t.start()
    return t


def serve(async_engine, server_cfg, sock: socket.socket, what: str = "") -> int:
    """Run uvicorn on the listening `sock` until a signal (0), or until the engine thread dies
    (1; async_engine.error says why). server_cfg: the config tree's server section."""
    from server.app import build_app, server_options

    server = None

    def on_engine_death() -> None:  # the engine thread's last act: nothing can be served any more
        if server is not None:
            server.should_exit = True

    app = build_app(async_engine, **server_options(server_cfg, on_engine_death))
    server = make_server(app, server_cfg)
    announce_ready(async_engine, what)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C/SIGTERM it handled, after a clean stop
        pass
    return 1 if async_engine.error else 0


def run(args: argparse.Namespace) -> int:
    from moe_rt_app.cli.flags import config_from_args

    cfg = config_from_args(args)  # flags over the config file: any problem is one line
    logging.basicConfig(level=cfg.server.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if cfg.parallel.ep > 1:
        from moe_rt_app.cli.serve_ep import serve_group

        return serve_group(args, cfg)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _serve_one(args, cfg)
    # SIGTERM (a supervisor's stop) ends the server as Ctrl-C does, with exit code 0: while loading
    # or compiling it interrupts; once uvicorn runs, uvicorn stops gracefully and then re-raises the
    # signal, through this handler, as the KeyboardInterrupt serve() catches.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _serve_one(args, cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_one(args: argparse.Namespace, cfg) -> int:
    from moe_rt_app.cli.flags import build_llm
    from server.async_engine import AsyncEngine

    srv = cfg.server
    sock = reserve(srv.host, srv.port)
    try:
        llm = build_llm(args, cfg)  # model, tokenizer, placement, dtype, device: any problem is one line
        started = time.perf_counter()
        warmed = llm.warm_up()  # compile=True: the decode graphs compile now, not in the first requests
        if warmed:
            print(f"moe-rt: compiled the decode graphs for batch sizes {', '.join(map(str, warmed))} "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    with llm, sock:
        srv = srv.model_copy(update={"served_model_name": srv.served_model_name or Path(cfg.model).resolve().name})
        print(serving_line(srv.served_model_name, sock, docs=srv.docs), flush=True)
        engine = AsyncEngine(llm.engine, max_queue=srv.max_queue)
        if serve(engine, srv, sock) == 0:
            return 0
    from moe_rt_app.cli.main import one_line

    print(f"moe-rt: error: {one_line(engine.error)}", file=sys.stderr)  # the traceback is in the log
    return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_rt_app.cli.serve ARGS` == `moe-rt serve ARGS`."""
    from moe_rt_app.cli.main import standalone

    return standalone("serve", argv)


if __name__ == "__main__":
    sys.exit(main())
