"""Start N ranks on this machine, each with torch.distributed set up, and collect their results.

    results = launch(2, fn, (arg,))      # fn(ep: EPGroup, arg) runs on every rank; results by rank

`launch` spawns Python processes (torch.multiprocessing, spawn) on loopback; `launch_commands`
runs a command line per rank (used by the bench to start ranks inside network namespaces).
Every started process is joined with a deadline and killed if it overruns, so a rank stuck in a
collective (because another rank failed) never outlives the call.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import subprocess
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from moe_rt.errors import MoeRtError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, addr: str, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, results, threads: int,
           backend: str | None, timeout_s: float) -> None:
    import torch

    from parallel.groups import destroy_ep, init_ep

    os.environ.update(rank_env(rank, world, "127.0.0.1", port))
    torch.set_num_threads(threads)
    try:
        ep = init_ep(backend, timeout_s=timeout_s)
        try:
            # Plain pickle bytes: a tensor sent through the queue would otherwise be shared memory
            # that vanishes when this process exits before the parent reads it.
            results.put((rank, True, pickle.dumps(fn(ep, *args))))
        finally:
            destroy_ep(ep)
    except BaseException as e:  # report every failure to the parent, which decides
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MoeRtError):
            msg = f"{type(e).__name__}: {msg}\n{traceback.format_exc()}"
        results.put((rank, False, msg))


def launch(n: int, fn: Callable[..., Any], args: tuple = (), *, timeout_s: float = 300.0,
           threads: int = 1, backend: str | None = None) -> list[Any]:
    """Run fn(ep, *args) on n ranks; returns each rank's result, rank order.

    fn and args must be picklable (fn a module-level function). A failing rank raises MoeRtError
    here with its message, after every process has been stopped.
    """
    if n < 1:
        raise MoeRtError(f"need at least one rank, got {n}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, n, port, fn, args, results, threads, backend, timeout_s),
                         daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break  # every process is gone; nothing more will arrive
                continue
            got[rank] = (ok, value)
            if not ok:
                break  # the other ranks may now wait forever in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if len(got) == n else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failed = sorted(r for r, (ok, _) in got.items() if not ok)
    if failed:
        raise MoeRtError(f"rank {failed[0]} failed: {got[failed[0]][1]}")
    missing = [r for r in range(n) if r not in got]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise MoeRtError(f"ranks {missing} gave no result within {timeout_s:.0f} s (exit codes {codes})")
    return [pickle.loads(got[r][1]) for r in range(n)]


def launch_commands(n: int, argv: list[str], *, addr: str = "127.0.0.1", port: int | None = None,
                    prefix: Callable[[int], list[str]] | None = None, timeout_s: float = 600.0,
                    env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run argv once per rank with the torch.distributed environment set; prefix(rank) is put in
    front (e.g. `ip netns exec NS`). Returns the finished processes (stdout/stderr captured)."""
    port = port or free_port()
    procs = []
    try:
        for r in range(n):
            e = {**os.environ, **(env or {}), **rank_env(r, n, addr, port)}
            cmd = (prefix(r) if prefix else []) + argv
            procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout_s
        out = []
        for p in procs:
            try:
                so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                so, se = p.communicate()
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
