"""`moe-rt bench serve`: closed-loop load on the HTTP server against offline LLM.generate.

It starts `python -m moe_rt_app.cli.serve` as a subprocess on a free loopback port (port 0; the server
prints the port it got), then runs --clients concurrent clients, each sending streaming
/v1/completions requests back to back until --duration ends (and at most --max-requests in all).
Prompts are random token ids of --prompt-len (any tokenizer), decoded greedily with ignore_eos so
every request yields exactly --max-tokens tokens. After the server stops, the same prompts run
through LLM.generate in this process with the same batch cap, so both figures come from one run on
one machine. Reported:
    requests_per_s, output_tokens_per_s     completed requests / tokens over the load's wall time
    ttft_p50/p99_s, e2e_p50/p99_s           per request, measured by the client
    status counts, errors_5xx, client_errors
    offline_tokens_per_s, served_over_offline
With --soak: the server's RSS (from /proc) every --rss-interval seconds: start, after a tenth of the
samples (warm), end, max, and the growth from warm to end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moe_rt.errors import MoeRtError

from .common import add_model_choice, add_torch_threads, resolve_model

MODEL_NAME = "bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_choice(p)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (closed loop)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load; in-flight requests then finish")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (random ids)")
    p.add_argument("--num-prompts", type=int, default=None, help="distinct prompts, cycled (default: 2 x clients)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch cap, served and offline (default: clients)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    add_torch_threads(p, where=" for the server and the offline run")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds the server may take to load")
    p.add_argument("--soak", action="store_true", help="also sample the server's RSS during the load")
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples (--soak)")
    p.add_argument("--skip-offline", action="store_true", help="skip the offline LLM.generate comparison")
    p.add_argument("--compile", action="store_true",
                   help="serve, and run offline, with compile=True (the server compiles its decode graphs "
                        "before it listens; the offline run's warm-up compiles them likewise)")


def _check(args) -> None:
    for name in ("clients", "max_requests", "max_tokens", "prompt_len"):
        if getattr(args, name) < 1:
            raise MoeRtError(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.rss_interval <= 0:
        raise MoeRtError("--duration and --rss-interval must be > 0")


def _prompts(model_dir: str, n: int, length: int) -> list[list[int]]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab, size=(n, length)).tolist()  # ids 0-2 are pad/bos/eos in our checkpoints


# -- the server subprocess ------------------------------------------------------------------------
def _start_server(args, model_dir: str, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    root = Path(__file__).resolve().parents[2]  # the checkout holding server/ (when not installed)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "moe_rt_app.cli.serve", "--model", model_dir, "--served-model-name", MODEL_NAME,
           "--host", "127.0.0.1", "--port", "0", "--dtype", args.dtype, "--device", args.device,
           "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max(256, 4 * args.clients)), "--log-level", "warning",
           *(["--compile"] if args.compile else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break  # the server exited
            if "serving" in line and "http://" in line:
                url = line.split("http://", 1)[1].split("/v1", 1)[0]
                return proc, f"http://{url}"
    _stop_server(proc)
    raise MoeRtError(f"the server did not start (exit code {proc.returncode}); run `python -m moe_rt_app.cli.serve` to see why")


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # a bench polling a real process, not test synchronisation
    raise MoeRtError("the server did not become healthy in time")


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- the load ---------------------------------------------------------------------------------------
async def _one(client, body: dict, rec: dict) -> None:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            rec["status"][r.status_code] = rec["status"].get(r.status_code, 0) + 1
            if r.status_code != 200:
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["stream_errors"] += 1
                    return
                if chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # timeouts, resets: counted, never fatal to the run
        rec["client_errors"] += 1
        rec["last_error"] = repr(e)
        return
    rec["ttft"].append(ttft if ttft is not None else float("nan"))
    rec["e2e"].append(time.perf_counter() - t0)
    rec["tokens"] += tokens


async def _load(args, url: str, prompts: list[list[int]], pid: int) -> dict:
    import httpx

    rec = {"status": {}, "ttft": [], "e2e": [], "tokens": 0, "client_errors": 0, "stream_errors": 0, "rss": []}
    counter = iter(range(args.max_requests))
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    stop = asyncio.Event()

    def body(i: int) -> dict:
        return {"model": MODEL_NAME, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        await _one(client, body(0), {**rec, "status": {}, "ttft": [], "e2e": []})  # warm-up, not counted
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def worker() -> None:
            while time.perf_counter() < deadline and (i := next(counter, None)) is not None:
                await _one(client, body(i), rec)

        async def sampler() -> None:
            while not stop.is_set():
                rec["rss"].append(_rss_bytes(pid))
                try:
                    await asyncio.wait_for(stop.wait(), args.rss_interval)
                except asyncio.TimeoutError:
                    pass

        rss_task = asyncio.create_task(sampler()) if args.soak else None
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        rec["wall_s"] = time.perf_counter() - t0
        stop.set()
        if rss_task is not None:
            await rss_task
            rec["rss"].append(_rss_bytes(pid))
    return rec


def _offline(args, model_dir: str, prompts: list[list[int]], max_num_seqs: int) -> float:
    import torch

    from moe_rt_app.llm import LLM
    from moe_rt.sampling_params import SamplingParams

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, progress=False, max_num_seqs=max_num_seqs,
              compile=args.compile)
    llm.warm_up()  # compile=True: every decode graph, as the server did before it listened
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], params)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def _pct(xs: list[float], q: float) -> float | None:
    xs = [x for x in xs if x == x]
    return float(np.percentile(xs, q)) if xs else None


def run(args: argparse.Namespace) -> int:
    _check(args)
    model_dir = resolve_model(args)
    max_num_seqs = args.max_num_seqs or args.clients
    prompts = _prompts(model_dir, args.num_prompts or 2 * args.clients, args.prompt_len)
    proc, url = _start_server(args, model_dir, max_num_seqs)
    try:
        _wait_healthy(proc, url, args.startup_timeout)
        rec = asyncio.run(_load(args, url, prompts, proc.pid))
    finally:
        _stop_server(proc)
    n = len(rec["e2e"])
    res = {
        "model": model_dir, "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len, "max_num_seqs": max_num_seqs, "device": args.device, "dtype": args.dtype,
        "torch_threads": args.torch_threads, "compile": args.compile,
        "requests": n, "wall_s": rec["wall_s"],
        "requests_per_s": n / rec["wall_s"], "output_tokens_per_s": rec["tokens"] / rec["wall_s"],
        "ttft_p50_s": _pct(rec["ttft"], 50), "ttft_p99_s": _pct(rec["ttft"], 99),
        "e2e_p50_s": _pct(rec["e2e"], 50), "e2e_p99_s": _pct(rec["e2e"], 99),
        "status": {str(k): v for k, v in sorted(rec["status"].items())},
        "errors_5xx": sum(v for k, v in rec["status"].items() if k >= 500),
        "client_errors": rec["client_errors"], "stream_errors": rec["stream_errors"],
    }
    if rec.get("last_error"):
        res["last_client_error"] = rec["last_error"]
    if args.soak:
        rss = [r for r in rec["rss"] if r is not None]
        # The KV cache and allocator pools fill during the first part of a soak; a leak shows as
        # growth after that, so the tenth-of-the-way sample is the reference for "flat".
        warm = rss[len(rss) // 10] if rss else None
        res["rss_mib"] = {"start": rss[0] / 2**20, "warm": warm / 2**20, "end": rss[-1] / 2**20,
                          "max": max(rss) / 2**20, "growth_after_warm": (rss[-1] - warm) / 2**20,
                          "samples": len(rss)} if rss else None
    if not args.skip_offline:
        res["offline_tokens_per_s"] = _offline(args, model_dir, prompts, max_num_seqs)
        res["served_over_offline"] = res["output_tokens_per_s"] / res["offline_tokens_per_s"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:>22}: {round(v, 4) if isinstance(v, float) else v}")
    return 1 if res["errors_5xx"] or res["client_errors"] or res["stream_errors"] else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ...`), the same as `moe-rt bench serve`."""
    from moe_rt_app.cli.main import standalone

    return standalone("bench serve", argv)


if __name__ == "__main__":
    sys.exit(main())
