"""`moe-rt serve --ep 2`: a real server process over two gloo ranks answers like the single process.

The server runs as a subprocess (the parent spawns rank 0, which serves HTTP, and rank 1, which
follows). Readiness is the 'moe-rt: ready' line on its stdout (printed once /health is 200), read
by a thread with a bounded queue wait: no sleeps, no polling. Every wait is bounded, and the
module's fixture kills whatever is left, so no process outlives the tests.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from moe_rt import SamplingParams
from moe_rt_app.cli import serve as cli_serve

from srv_helpers import sse_events

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0
PROMPTS = ["In the beginning God created", "And the earth was", "Hello world, the quick", "And God said"]
MAX_TOKENS = 10


class ServeProcess:
    """`python -m moe_rt_app.cli.serve --ep 2 ...` with its output lines collected by reader threads."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moe_rt_app.cli.serve", *argv], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for t in self._readers:
            t.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the process closed its stdout (exited)

    def wait_line(self, pattern: str) -> re.Match:
        """The first later stdout line matching pattern (bounded; fails if the process ends first)."""
        return self.wait_lines(pattern)[0]

    def wait_lines(self, *patterns: str) -> list[re.Match]:
        """One later stdout line matching each pattern, in any order (bounded; fails if the process
        ends first)."""
        found: dict[str, re.Match] = {}
        while len(found) < len(patterns):
            missing = [p for p in patterns if p not in found]
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"no line matching {missing!r} within {WAIT} s; stderr: {''.join(self.err)[-2000:]}")
            if line is None:
                self.proc.wait(WAIT)
                for t in self._readers:
                    t.join(WAIT)
                pytest.fail(f"the server exited ({self.proc.returncode}) before {missing!r}; stderr: {''.join(self.err)[-2000:]}")
            for p in missing:
                if m := re.search(p, line):
                    found[p] = m
        return [found[p] for p in patterns]

    def stop(self) -> int:
        """SIGTERM, as a supervisor would; returns the exit code (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            for t in self._readers:
                t.join(WAIT)


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
