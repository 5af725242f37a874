"""`moe-rt serve --ep 2`: a real server process over two gloo ranks answers like the single process.

The server runs as a subprocess (the parent spawns rank 0, which serves HTTP, and rank 1, which
follows). Readiness is the 'moe-rt: ready' line on its stdout (printed once /health is 200), read
by a thread with a bounded queue wait: no sleeps, no polling. Every wait is bounded, and the
module's fixture kills whatever is left, so no process outlives the tests.
"""
from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from moe_rt import SamplingParams
from moe_rt_app.cli import serve as cli_serve

from srv_helpers import WAIT, ServeProcess, sse_events

PROMPTS = ["In the beginning God created", "And the earth was", "Hello world, the quick", "And God said"]
MAX_TOKENS = 10


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def ep_server(mixtral_dir):
    """(base url, ServeProcess, rank pids) of `serve --ep 2` on the tiny Mixtral (4 heads, 2 KV heads)."""
    sp = ServeProcess(["--model", str(mixtral_dir), "--port", "0", "--ep", "2", "--dtype", "float32",
                       "--device", "cpu", "--max-num-seqs", "8", "--log-level", "warning", "--served-model-name", "m"])
    pids: list[int] = []
    try:
        served, started = sp.wait_lines(r"on (http://\S+)/v1 ", r"started 2 ranks \(pids (\d+) (\d+)\)")
        url, pids = served.group(1), [int(p) for p in started.groups()]
        sp.wait_line(r"moe-rt: ready \(2 expert-parallel ranks\)")
        yield url, sp, pids
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(WAIT)
        _kill_all(pids)  # ranks also leave by themselves once the parent is gone; this is a backstop


def _complete(url: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=WAIT,
                   json={"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_concurrent_greedy_completions_equal_single_process(ep_server, mixtral_llm):
    url, _, _ = ep_server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: _complete(url, p), PROMPTS))
    ref = mixtral_llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [c["text"] for c in got] == [o.text for o in ref]
    assert [c["finish_reason"] for c in got] == [o.finish_reason for o in ref]
    # The EP figures are the group's (both ranks joined the all-gather through a "stats" batch).
    stats = httpx.get(url + "/v1/moe/stats", timeout=WAIT).json()
    ep = stats["ep"]
    assert ep["ranks"] == 2 and ep["tokens"] > 0 and ep["steps"] > 0
    assert ep["bytes_by_collective"]["a2a_dispatch"] > 0
    metrics = httpx.get(url + "/metrics", timeout=WAIT).text
    assert re.search(r"^moe_rt_moe_ep_ranks 2\.0$", metrics, re.M), metrics[:2000]


def test_streaming_completion_equals_single_process(ep_server, mixtral_llm):
    url, _, _ = ep_server
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ref = mixtral_llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason


def test_sigterm_stops_every_rank(ep_server):
    """Runs last in this module: the parent forwards SIGTERM to rank 0, whose engine thread sends
    'shutdown' to the follower; all exit 0."""
    url, sp, pids = ep_server
    assert httpx.get(url + "/health", timeout=WAIT).status_code == 200
    assert sp.stop() == 0, "".join(sp.err)[-2000:]
    for pid in pids:  # the parent joined its ranks before it exited
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in "".join(sp.err), "".join(sp.err)[-2000:]


def test_bad_ep_count_is_one_line(mixtral_dir, capsys):
    assert cli_serve.main(["--model", str(mixtral_dir), "--ep", "0"]) == 2
    assert capsys.readouterr().err.strip() == "moe-rt: error: --ep must be >= 1, got 0"


def test_ep_count_that_does_not_split_the_heads_is_one_line(mixtral_dir, capsys):
    assert cli_serve.main(["--model", str(mixtral_dir), "--ep", "4", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moe-rt: error: attention tensor parallelism over 4 ranks needs heads (4) and KV heads (2) divisible by 4"


def test_a_dead_follower_ends_the_group_with_one_line(mixtral_dir):
    sp = ServeProcess(["--model", str(mixtral_dir), "--port", "0", "--ep", "2", "--dtype", "float32",
                       "--device", "cpu", "--log-level", "critical"])
    pids: list[int] = []
    try:
        pids = [int(p) for p in sp.wait_line(r"started 2 ranks \(pids (\d+) (\d+)\)").groups()]
        sp.wait_line(r"moe-rt: ready")
        psutil.Process(pids[1]).kill()
        assert sp.proc.wait(WAIT) == 1
        for t in sp._readers:
            t.join(WAIT)
        assert f"moe-rt: error: rank 1 exited with code {-signal.SIGKILL}\n" in sp.err, "".join(sp.err)[-2000:]
        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(WAIT)
        _kill_all(pids)
