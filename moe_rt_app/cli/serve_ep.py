"""Process side of `moe-rt serve --ep N`: the parent that checks, starts, watches and stops the
group, and each rank's entry (parallel/serve_ep.py holds the protocol, driver and follower).

Start-up: the parent checks everything cheap (check_group) and reserves the port before
any rank exists. Every rank then builds its model in its main thread and waits at a barrier;
only when all ranks got there does rank 0 listen, print "moe-rt: serving ..." and run uvicorn.
A rank failing before the barrier is a start-up failure: the parent stops the others and ends
with its one line and exit 2. After it, a failing rank is a crash (exit 1, traceback in its log).

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
from pathlib import Path

from moe_rt.errors import MoeRtError
from parallel.serve_ep import FOLLOWER_EXIT_S, ControlChannel, EPEngineDriver, follower_loop

log = logging.getLogger(__name__)

# What a rank reports to the parent when it fails (with one line): a user error (MoeRtError), any
# other failure before the group serves, or a crash while serving.
USAGE, STARTUP, CRASH = "usage", "startup", "crash"


# -- one rank ------------------------------------------------------------------------------------
def serve_ep_main(ep, cfg, sock=None, on_serving=lambda: None) -> int:
    """The per-rank entry: rank 0 serves HTTP on `sock` (bound by the parent), the others follow.
    `on_serving` is called once every rank has its model (start-up is over)."""
    import torch.distributed as dist

    control = ControlChannel.create(ep.world)  # every rank, before anything else that may fail
    from moe_rt_app.ep_llm import ep_llm_from_config

    ep_llm = ep_llm_from_config(cfg, ep)
    # No rank serves or follows until every rank has its model: a rank that failed to load never
    # gets here, the parent sees it exit and stops the group (this barrier does not return).
    dist.barrier(group=control.group)
    on_serving()
    if ep.rank != 0:
        follower_loop(control, ep_llm)
        return 0

    from server.async_engine import AsyncEngine
    from moe_rt_app.cli.serve import serve, serving_line

    driver = EPEngineDriver(ep_llm, control)
    # Given as a factory, the driver belongs to the AsyncEngine: its engine thread closes it when
    # it ends, which sends "shutdown" to the followers (only that thread may talk to the group).
    srv = cfg.server
    engine = AsyncEngine(lambda: driver, max_queue=srv.max_queue)
    sock.listen(2048)
    print(serving_line(srv.served_model_name, sock, docs=srv.docs), flush=True)
    if serve(engine, srv, sock, f" ({ep.world} expert-parallel ranks)") != 0:
        raise EngineDied(engine.error or "the engine failed")
    return 0


class EngineDied(Exception):
    """Rank 0's engine thread ended with an error while serving (its traceback is logged already)."""


def _one_line(e: BaseException) -> str:
    from moe_rt_app.cli.main import one_line

    text = one_line(str(e)) or type(e).__name__
    return text if isinstance(e, MoeRtError) else f"{type(e).__name__}: {text}"


def _exit_with_parent() -> None:
    """A rank outlives nothing: if the parent dies (even by SIGKILL), leave at once."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp_conn.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="moe-rt-parent-watch", daemon=True).start()


def _rank_entry(rank: int, world: int, master_port: int, cfg, sock, report) -> None:
    """Process body of one rank (module level: spawn pickles it)."""
    import torch

    from moe_rt_app.cli.main import DEBUG_ENV
    from parallel.groups import destroy_ep, init_ep
    from parallel.launch import rank_env

    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only; it stops the ranks in order
    _exit_with_parent()
    # Rank 0: SIGTERM before uvicorn runs (still loading) ends it like Ctrl-C; uvicorn then
    # installs its own handlers. Followers: only the shutdown batch or the parent's kill ends them.
    signal.signal(signal.SIGTERM, signal.default_int_handler if rank == 0 else signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler if rank == 0 else signal.SIG_IGN)
    logging.basicConfig(level=cfg.server.log_level.upper(), format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    os.environ.update(rank_env(rank, world, "127.0.0.1", master_port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    phase = [STARTUP]

    def serving() -> None:
        phase[0] = CRASH

    code = 0
    try:
        ep = init_ep()
        try:
            code = serve_ep_main(ep, cfg, sock, on_serving=serving)
        finally:
            destroy_ep(ep)
    except KeyboardInterrupt:
        code = 0  # stopped while loading
    except BaseException as e:
        kind = USAGE if isinstance(e, MoeRtError) else phase[0]
        # A crash while serving keeps its traceback in the log; a start-up failure is one line
        # (the parent prints it) unless MOE_RT_DEBUG asks for more.
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        if (kind == CRASH and not isinstance(e, EngineDied)) or (kind == STARTUP and debug):
            traceback.print_exc()
        report.send((kind, _one_line(e)))
        code = 2 if kind != CRASH else 1
    sys.stdout.flush()
    sys.exit(code)


# -- the parent --------------------------------------------------------------------------------
def serve_group(args, cfg) -> int:
    """`moe-rt serve --ep N`: check, reserve the port, then start and supervise the ranks."""
    from moe_rt_app.cli.serve import reserve

    check_group(cfg)
    name = cfg.server.served_model_name or Path(cfg.model).resolve().name
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"served_model_name": name})})
    return run_group(cfg, reserve(cfg.server.host, cfg.server.port))


def run_group(cfg, sock) -> int:
    """Spawn cfg.parallel.ep ranks (rank 0 gets the listening socket), supervise them, return the exit code.

    SIGINT/SIGTERM to the parent: SIGTERM to rank 0, whose graceful stop ends the followers.
    Any rank failing: every other rank is stopped and its one-line reason is printed (a user
    error or a start-up failure is raised as MoeRtError, exit 2; a crash while serving exits 1).
    """
    from parallel.launch import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs, reports = [], []
    try:
        for r in range(cfg.parallel.ep):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_entry, args=(r, cfg.parallel.ep, port, cfg, sock if r == 0 else None, send),
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
    print(f"moe-rt: started {cfg.parallel.ep} ranks (pids {' '.join(str(p.pid) for p in procs)})", flush=True)

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
    # A usage error (MoeRtError) on any rank explains the others' broken collectives; then the
    # reason of the rank that failed first.
    for r, kind, msg in sorted(got, key=lambda g: (g[1] != USAGE, g[0] != rank)):
        if kind != CRASH:
            raise MoeRtError(f"rank {r}: {msg}")
        print(f"moe-rt: error: rank {r} failed: {msg}", file=sys.stderr)
        return 1
    print(f"moe-rt: error: rank {rank} exited with code {procs[rank].exitcode}", file=sys.stderr)
    return 1


def _report_of(conn) -> tuple[str, str] | None:
    """(USAGE | STARTUP | CRASH, one line) a rank sent before it exited, or None (killed, or it sent nothing)."""
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


def check_group(cfg) -> None:
    """The cheap checks of `serve --ep N`, run in the parent before any port or rank exists, so a
    bad flag or model folder is one line and exit 2: dtype and device against the group's, the
    model folder (config, weight headers, tokenizer), heads and experts split over N ranks, and
    the placement. (The config tree already refused what the ranks cannot honour: an expert
    cache, a predictor without the speculative dispatcher.)"""
    import torch

    from moe_rt.checkpoint import CheckpointReader
    from moe_rt.device import resolve_device, resolve_dtype
    from moe_rt.loader import load_spec
    from moe_rt.tokenizer import Tokenizer
    from moe_rt_app.cli.flags import check_expert_compute
    from moe_rt_app.ep_llm import resolve_placement
    from parallel.tp import check_attention_tp

    ranks = cfg.parallel.ep
    # The group's device is chosen as parallel.groups.init_ep does: nccl on CUDA when there is a GPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device != "auto" and resolve_device(cfg.device).type != device.type:
        raise MoeRtError(f"--device {cfg.device}: the --ep ranks run on {device.type} on this machine")
    if device.type == "cuda" and torch.cuda.device_count() < ranks:
        raise MoeRtError(f"--ep {ranks} needs {ranks} GPUs; this machine has {torch.cuda.device_count()}")
    resolve_dtype(cfg.dtype, device)
    check_expert_compute(cfg.engine.expert_compute, device.type)
    spec = load_spec(cfg.model)
    CheckpointReader(cfg.model)  # opens every weight file's header
    Tokenizer(cfg.model)
    check_attention_tp(spec.attention, ranks)
    L, E = len(spec.moe_layer_ids), spec.num_experts
    placement = resolve_placement(cfg.expert_parallel, L, E, ranks)
    if placement.ranks != ranks:
        raise MoeRtError(f"the placement is for {placement.ranks} ranks but --ep is {ranks}")
    placement.validate_against(L, E)
