"""Process side of `moe-rt serve --ep N`: each rank's entry and the parent that starts,
watches and stops the group (parallel/serve_ep.py holds the protocol, driver and follower).

Invariant: if any rank dies, every other rank is stopped: a group with a missing rank would
hang in its next collective.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mp_conn
import os
import signal
import sys
import threading
import traceback

from moe_rt.errors import MoeRtError
from parallel.serve_ep import FOLLOWER_EXIT_S, ControlChannel, EPEngineDriver, follower_loop

log = logging.getLogger(__name__)


# -- one rank ------------------------------------------------------------------------------------
def _build(ep, args):
    from parallel.runtime import EPOptions, build_ep_llm

    options = EPOptions(dispatcher=args.ep_dispatcher, placement=args.placement, predictor=args.ep_predictor)
    llm_options = {"dtype": args.dtype}
    if args.device != "auto":
        llm_options["device"] = args.device  # build_ep_llm checks it against the group's device
    for name in ("max_num_seqs", "max_model_len", "kv_cache_memory_gb"):
        if getattr(args, name) is not None:
            llm_options[name] = getattr(args, name)
    return build_ep_llm(args.model, ep, options, **llm_options)


def serve_ep_main(ep, args, sock=None) -> int:
    """The per-rank entry: rank 0 serves HTTP on `sock` (already listening), the others follow."""
    control = ControlChannel.create(ep.world)  # every rank, before anything else that may fail
    if ep.rank != 0:
        follower_loop(control, _build(ep, args))
        return 0

    from server.app import build_app
    from server.async_engine import AsyncEngine
    from server.cli_serve import announce_ready, make_server

    server = None

    def stop_http() -> None:  # the engine thread ended (cleanly or not): stop serving too
        if server is not None:
            server.should_exit = True

    def factory() -> EPEngineDriver:  # runs on the engine thread: /health says 503 meanwhile
        try:
            return EPEngineDriver(_build(ep, args), control, on_close=stop_http)
        except BaseException:
            stop_http()  # a group whose model did not load cannot serve; the parent reports why
            raise

    engine = AsyncEngine(factory, max_queue=args.max_queue)
    app = build_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes)
    server = make_server(app, args)
    announce_ready(engine, f" ({ep.world} expert-parallel ranks)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGTERM/SIGINT it handled, after a clean stop
        pass
    if engine.error:
        raise MoeRtError(engine.error)
    return 0


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _exit_with_parent() -> None:
    """A rank outlives nothing: if the parent dies (even by SIGKILL), leave at once."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp_conn.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="moe-rt-parent-watch", daemon=True).start()


def _rank_entry(rank: int, world: int, master_port: int, args, sock, report) -> None:
    """Process body of one rank (module level: spawn pickles it)."""
    import torch

    from parallel.groups import destroy_ep, init_ep
    from parallel.launch import rank_env

    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only; it stops the ranks in order
    _exit_with_parent()
    # Rank 0: SIGTERM before uvicorn runs (still loading) ends it like Ctrl-C; uvicorn then
    # installs its own handlers. Followers: only the shutdown batch or the parent's kill ends them.
    signal.signal(signal.SIGTERM, signal.default_int_handler if rank == 0 else signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler if rank == 0 else signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    os.environ.update(rank_env(rank, world, "127.0.0.1", master_port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    code = 0
    try:
        ep = init_ep()
        try:
            code = serve_ep_main(ep, args, sock)
        finally:
            destroy_ep(ep)
    except KeyboardInterrupt:
        code = 0  # stopped while loading
    except BaseException as e:
        if not isinstance(e, MoeRtError):
            traceback.print_exc()
        report.send((isinstance(e, MoeRtError), _one_line(e)))
        code = 2 if isinstance(e, MoeRtError) else 1
    sys.stdout.flush()
    sys.exit(code)


# -- the parent --------------------------------------------------------------------------------
def run_group(args, sock) -> int:
    """Spawn args.ep ranks (rank 0 gets the listening socket), supervise them, return the exit code.

    SIGINT/SIGTERM to the parent: SIGTERM to rank 0, whose graceful stop ends the followers.
    Any rank failing: every other rank is stopped and its one-line reason is printed (a rank's
    MoeRtError is raised, exit 2).
    """
    from parallel.launch import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs, reports = [], []
    try:
        for r in range(args.ep):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_entry, args=(r, args.ep, port, args, sock if r == 0 else None, send),
                            name=f"moe-rt-ep{r}")
            p.start()
            send.close()
            procs.append(p)
            reports.append(recv)
    except BaseException:
        _reap(procs)
        raise
    finally:
        sock.close()  # rank 0 holds its own copy; connections must not queue here after it is gone
    print(f"moe-rt: started {args.ep} ranks (pids {' '.join(str(p.pid) for p in procs)})", flush=True)

    stopping = []

    def on_signal(signum, frame) -> None:
        if not stopping:
            stopping.append(signum)
            if procs[0].is_alive():
                os.kill(procs[0].pid, signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(procs, reports, stopping)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _reap(procs)


def _supervise(procs, reports, stopping) -> int:
    alive = dict(enumerate(procs))
    while alive:
        mp_conn.wait([p.sentinel for p in alive.values()])  # signal handlers run meanwhile
        for r, p in list(alive.items()):
            if p.is_alive():
                continue
            p.join()
            del alive[r]
            if p.exitcode != 0:
                return _fail(procs, reports, r)
            if r == 0:
                # Rank 0 stopped cleanly and sent "shutdown": the followers leave by themselves.
                for q in alive.values():
                    q.join(FOLLOWER_EXIT_S)
                late = [q.pid for q in alive.values() if q.is_alive()]
                if late:
                    print(f"moe-rt: error: follower ranks (pids {late}) did not stop; killed", file=sys.stderr)
                    return 1
                failed = [q for q in alive if procs[q].exitcode != 0]
                return _fail(procs, reports, failed[0]) if failed else 0
    return 0


def _fail(procs, reports, rank: int) -> int:
    """Stop the group after rank `rank` failed; report the most telling reason."""
    _reap(procs)
    got = [(r, *msg) for r, c in enumerate(reports) if (msg := _report_of(c)) is not None]
    # A usage error (MoeRtError) on any rank explains the others' broken collectives.
    for r, usage, msg in sorted(got, key=lambda g: (not g[1], g[0] != rank)):
        if usage:
            raise MoeRtError(f"rank {r}: {msg}")
        print(f"moe-rt: error: rank {r} failed: {msg}", file=sys.stderr)
        return 1
    print(f"moe-rt: error: rank {rank} exited with code {procs[rank].exitcode}", file=sys.stderr)
    return 1


def _report_of(conn) -> tuple[bool, str] | None:
    """(usage error?, one line) a rank sent before it exited, or None (killed, or it sent nothing)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):  # the pipe closed with nothing in it
        return None


def _reap(procs, grace_s: float = 5.0) -> None:
    """Stop every rank still running: SIGTERM, a bounded wait, then SIGKILL."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(grace_s)
