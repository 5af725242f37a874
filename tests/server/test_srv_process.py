"""`moe-rt serve` as a real process on loopback: SIGTERM (a supervisor's stop) ends it cleanly with
exit code 0; with --compile the decode graphs compile before the server listens (the line saying
so comes before the serving line), and the server then answers with the eager engine's tokens,
its counters free of the warm-up's steps. Every wait is a bounded read of its output lines."""
from __future__ import annotations

import re

import httpx

from moe_rt import SamplingParams

from srv_helpers import WAIT, ServeProcess

PROMPT = "In the beginning God created"


def test_sigterm_ends_serve_with_exit_code_0(mixtral_dir):
    sp = ServeProcess(["--model", str(mixtral_dir), "--port", "0", "--dtype", "float32", "--device", "cpu",
                       "--log-level", "info"])
    try:
        url = sp.wait_line(r"on (http://\S+)/v1 ").group(1)
        sp.wait_line(r"moe-rt: ready")
        assert httpx.get(url + "/health", timeout=WAIT).status_code == 200
        assert sp.stop() == 0, "".join(sp.err)[-2000:]
        assert any("Application shutdown complete" in line for line in sp.err)  # uvicorn's graceful stop
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(WAIT)


def test_serve_compile_compiles_before_it_listens(mixtral_dir, mixtral_llm):
    sp = ServeProcess(["--model", str(mixtral_dir), "--port", "0", "--compile", "--dtype", "float32",
                       "--device", "cpu", "--max-num-seqs", "2", "--log-level", "warning",
                       "--served-model-name", "m"])
    try:
        assert sp.wait_line(r"moe-rt: compiled the decode graphs for batch sizes (.*) in ").group(1) == "1, 2"
        url = sp.wait_line(r"on (http://\S+)/v1 ").group(1)  # only after: wait_line reads lines in order
        sp.wait_line(r"moe-rt: ready")
        r = httpx.post(url + "/v1/completions", timeout=WAIT,
                       json={"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        want = mixtral_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0]
        assert r.json()["choices"][0]["text"] == want.text
        # the warm-up's steps and tokens are not counted: one prefill and 7 decode steps, 8 tokens
        metrics = httpx.get(url + "/metrics", timeout=WAIT).text
        assert re.search(r"^moe_rt_engine_steps_total 8\.0$", metrics, re.M), metrics[:3000]
        assert re.search(r"^moe_rt_generation_tokens_total 8\.0$", metrics, re.M), metrics[:3000]
        assert sp.stop() == 0
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(WAIT)


def test_bench_serve_with_compile(mixtral_dir, capsys):
    """`moe-rt bench serve --compile`: a compiled server under load, beside a compiled offline run;
    every request answered (the duration is long: --max-requests ends the load, not a clock)."""
    import json

    from moe_rt_app.bench import serve as bench_serve

    assert bench_serve.main(["--model", str(mixtral_dir), "--clients", "2", "--duration", "600",
                             "--max-requests", "4", "--max-tokens", "4", "--prompt-len", "4",
                             "--compile", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["compile"] is True and res["requests"] == 4 and res["errors_5xx"] == 0
    assert res["offline_tokens_per_s"] > 0
