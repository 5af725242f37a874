"""`moe-rt serve` start-up and exit: bad input is one line and exit 2 before anything listens
(scripts/startup_failures.py has the full list; a subset runs here as real subprocesses), the
server flags reach the app, and a dead engine ends the command with exit 1."""
import importlib.util
import queue
import sys
import threading
from pathlib import Path

import httpx
import pytest

from moe_rt_app.bench import serve as bench_serve
from moe_rt.engine.llm_engine import LLMEngine
from moe_rt_app.cli import serve as cli_serve

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0


def load_script():
    spec = importlib.util.spec_from_file_location("startup_failures", ROOT / "scripts" / "startup_failures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


# One of each kind of check: weights, config, tokenizer, placement, the port, the device rule, the
# expert-parallel parent check and a failure inside a rank.
SUBSET = [
    "truncated model.safetensors", "config.json not JSON", "corrupt tokenizer.json", "malformed placement YAML",
    "port already in use", "--expert-compute triton without a GPU", "--ep 3 not dividing the KV heads",
    "--ep 2, a rank cannot build its predictor",
]


def test_startup_failures_are_one_line_and_exit_2(mixtral_dir):
    script = load_script()
    cases = [c for c in script.CASES if c.name in SUBSET and not (c.needs_cpu_only and script.cuda_available())]
    assert len(cases) >= len(SUBSET) - 1
    results = script.run_cases(cases, Path(mixtral_dir), jobs=2, timeout=WAIT)
    assert all(r.ok for r in results), "\n" + script.table(results)


def test_serve_rejects_a_folder_without_a_model(tmp_path, capsys):
    assert cli_serve.main(["--model", str(tmp_path), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"moe-rt: error: {tmp_path} has no config.json (not a Hugging Face model folder)\n"


@pytest.mark.parametrize("argv, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--max-body-bytes", "-5"], "--max-body-bytes must be >= 1, got -5"),
    (["--offload", "disk", "--expert-cache-slots", "0"], "--expert-cache-slots must be >= 1, got 0"),
    (["--offload", "disk"], "offload flags: give exactly one of --expert-cache-slots and --expert-cache-gb"),
    (["--ep", "2", "--offload", "cpu", "--expert-cache-slots", "2"], "expert parallelism (--ep > 1) does not combine with an expert cache yet; remove the cache section or run on one rank"),
])
def test_serve_rejects_bad_flags_before_binding(mixtral_dir, capsys, argv, message):
    assert cli_serve.main(["--model", str(mixtral_dir), "--port", "0", *argv]) == 2
    assert capsys.readouterr().err == f"moe-rt: error: {message}\n"


def test_bench_serve_rejects_bad_counts(mixtral_dir, capsys):
    assert bench_serve.main(["--model", str(mixtral_dir), "--clients", "0"]) == 2
    assert "--clients must be >= 1" in capsys.readouterr().err


def test_flags_reach_the_app_and_a_dead_engine_ends_serve(mixtral_dir, monkeypatch, capsys):
    """`serve --disable-docs` serves no /docs; when the engine thread dies, uvicorn stops and
    serve returns 1 with one line saying why."""
    ports: queue.Queue = queue.Queue()
    line = cli_serve.serving_line

    def spy(name, sock, docs):  # the port serve listens on, as its "serving" line prints it
        ports.put(sock.getsockname()[1])
        return line(name, sock, docs)

    def broken_step(self):
        raise RuntimeError("a kernel blew up")

    monkeypatch.setattr(cli_serve, "serving_line", spy)
    monkeypatch.setattr(LLMEngine, "step", broken_step)
    codes: queue.Queue = queue.Queue()
    argv = ["--model", str(mixtral_dir), "--port", "0", "--dtype", "float32", "--device", "cpu",
            "--disable-docs", "--disable-access-log", "--log-stats-interval", "0", "--log-level", "critical"]
    thread = threading.Thread(target=lambda: codes.put(cli_serve.main(argv)), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{ports.get(timeout=WAIT)}"
    assert httpx.get(url + "/health", timeout=WAIT).status_code in (200, 503)
    assert httpx.get(url + "/docs", timeout=WAIT).status_code == 404
    assert httpx.get(url + "/openapi.json", timeout=WAIT).status_code == 404
    r = httpx.post(url + "/v1/completions", json={"model": Path(mixtral_dir).name, "prompt": "In the", "max_tokens": 4},
                   timeout=WAIT)
    assert r.status_code == 503, r.text
    thread.join(WAIT)
    assert not thread.is_alive(), "serve did not stop after its engine died"
    assert codes.get_nowait() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moe-rt: error: the engine failed") and "a kernel blew up" in err[-1]
