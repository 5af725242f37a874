"""Start `moe-rt serve` in every way that must fail, and check that each fails well.

    python scripts/startup_failures.py                  # against the shipped demo model
    python scripts/startup_failures.py --model DIR --jobs 4 --only config,port

Each case copies the model folder (or not), breaks one thing (a truncated weights file, a
corrupt tokenizer, a port already in use, a flag out of range, ...) and runs
`python -m moe_rt_app.cli.main serve ...` as a subprocess with a timeout. A case passes when the process
  * exits with code 2 before the timeout,
  * wrote exactly one non-empty line on stderr, and no "Traceback",
  * never printed the "moe-rt: serving" line (nothing was listening on a broken start).
Prints one row per case and exits 1 if any case fails. tests/server/test_srv_cli.py runs a subset.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    flags: tuple[str, ...] = ()  # serve flags; "{model}" is the (broken) model folder, "{dir}" the case folder
    breaks: Callable[[Path], None] | None = None  # corrupts a copy of the model folder
    model: bool = True  # pass --model {model}
    needs_cpu_only: bool = False  # the failure only exists on a machine without CUDA


@dataclass
class Result:
    case: Case
    code: int | None  # None: killed at the timeout
    seconds: float
    stderr: str
    stdout: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- ways to break a model folder -----------------------------------------------------------------
def _weights(d: Path) -> Path:
    return next(iter(sorted(d.glob("*.safetensors"))))


def truncate_weights(d: Path) -> None:
    w = _weights(d)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])


def corrupt_header(d: Path) -> None:
    w = _weights(d)
    data = bytearray(w.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after its 8-byte length
    w.write_bytes(bytes(data))


def tiny_weights(d: Path) -> None:
    _weights(d).write_bytes(b"abc")


def remove_weights(d: Path) -> None:
    for w in d.glob("*.safetensors"):
        w.unlink()


def bad_index(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _config_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / name).write_text(text)
    return write


def _remove(name: str) -> Callable[[Path], None]:
    def remove(d: Path) -> None:
        (d / name).unlink()
    return remove


def _hidden_size_as_text(c: dict) -> None:
    c["hidden_size"] = "wide"


def _no_sizes(c: dict) -> None:
    for k in ("hidden_size", "num_hidden_layers"):
        c.pop(k, None)


def _unknown_arch(c: dict) -> None:
    c["architectures"] = ["LlamaForCausalLM"]


def _other_shape(c: dict) -> None:
    c["intermediate_size"] = c["intermediate_size"] * 2  # the weights no longer fit


def _placement(text: str) -> Callable[[Path], None]:
    return _write("placement.yaml", text)


CASES: list[Case] = [
    # the model folder
    Case("no such model folder", ("--model", "{dir}/nothing-here"), model=False),
    Case("folder without config.json", breaks=_remove("config.json")),
    Case("truncated model.safetensors", breaks=truncate_weights),
    Case("corrupt safetensors header", breaks=corrupt_header),
    Case("3-byte model.safetensors", breaks=tiny_weights),
    Case("no weights file", breaks=remove_weights),
    Case("index without weight_map", breaks=bad_index),
    Case("config.json not JSON", breaks=_write("config.json", "{not json")),
    Case("config.json not an object", breaks=_write("config.json", "[1, 2, 3]")),
    Case("config.json missing fields", breaks=_config_edit(_no_sizes)),
    Case("config.json field of wrong type", breaks=_config_edit(_hidden_size_as_text)),
    Case("unknown architecture", breaks=_config_edit(_unknown_arch)),
    Case("config does not match weights", breaks=_config_edit(_other_shape)),
    Case("missing tokenizer.json", breaks=_remove("tokenizer.json")),
    Case("corrupt tokenizer.json", breaks=_write("tokenizer.json", "{garbage")),
    Case("corrupt tokenizer_config.json", breaks=_write("tokenizer_config.json", "{garbage")),
    Case("corrupt generation_config.json", breaks=_write("generation_config.json", "[")),
    # numerics and device
    Case("bad --dtype", ("--dtype", "int3")),
    Case("bad --device", ("--device", "tpu")),
    Case("--device cuda without a GPU", ("--device", "cuda"), needs_cpu_only=True),
    Case("--expert-compute triton without a GPU", ("--expert-compute", "triton"), needs_cpu_only=True),
    # placement
    Case("missing --placement file", ("--placement", "{dir}/absent.yaml")),
    Case("malformed placement YAML", ("--placement", "{model}/placement.yaml"), breaks=_placement("cache: [1, 2")),
    Case("placement with an unknown section", ("--placement", "{model}/placement.yaml"),
         breaks=_placement("caches:\n  capacity_slots: 2\n")),
    Case("placement not matching the model", ("--placement", "{model}/placement.yaml"),
         breaks=_placement("cache:\n  capacity_slots: 2\n  pinned:\n    0: [999]\n")),
    # flags
    Case("--port 70000", ("--port", "70000")),
    Case("--port -1", ("--port", "-1")),
    Case("port already in use", ("--port", "{busy_port}")),
    Case("--host not an address", ("--host", "no.such.host.invalid")),
    Case("--max-body-bytes -5", ("--max-body-bytes", "-5")),
    Case("--max-queue 0", ("--max-queue", "0")),
    Case("--max-num-seqs 0", ("--max-num-seqs", "0")),
    Case("--max-model-len beyond the model", ("--max-model-len", "10000000")),
    Case("--kv-cache-memory-gb 0", ("--kv-cache-memory-gb", "0")),
    Case("--kv-cache-memory-gb too small", ("--kv-cache-memory-gb", "0.0000001")),
    Case("empty --api-key", ("--api-key=",)),
    Case("--log-stats-interval -1", ("--log-stats-interval", "-1")),
    Case("--offload without a capacity", ("--offload", "cpu")),
    Case("--expert-cache-slots 0", ("--offload", "cpu", "--expert-cache-slots", "0")),
    Case("unknown --track-predictor", ("--track-predictor", "clairvoyant")),
    # expert parallelism
    Case("--ep 0", ("--ep", "0")),
    Case("--ep 3 not dividing the KV heads", ("--ep", "3")),
    Case("--ep 2 with offloading", ("--ep", "2", "--offload", "cpu", "--expert-cache-slots", "2")),
    Case("--ep 2 on a truncated model", ("--ep", "2"), breaks=truncate_weights),
    Case("--ep 2, a rank cannot build its predictor",
         ("--ep", "2", "--ep-dispatcher", "speculative", "--ep-predictor", "clairvoyant")),
]


def prepare(case: Case, model: Path, work: Path) -> Path:
    """The case's folder: a broken copy of the model (or the model itself when nothing breaks)."""
    folder = work / "".join(c if c.isalnum() else "_" for c in case.name)
    folder.mkdir(parents=True)
    if case.breaks is None:
        return model
    copy = folder / "model"
    shutil.copytree(model, copy)
    case.breaks(copy)
    return copy


def run_case(case: Case, model: Path, work: Path, busy_port: int, timeout: float) -> Result:
    model_dir = prepare(case, model, work)
    fill = {"model": str(model_dir), "dir": str(work), "busy_port": str(busy_port)}
    argv = (["--model", str(model_dir)] if case.model else []) + [f.format(**fill) for f in case.flags]
    cmd = [sys.executable, "-m", "moe_rt_app.cli.main", "serve", "--port", "0", "--dtype", "float32", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MOE_RT_DEBUG", None)
    # The cases describe a plain CPU machine: under the Triton interpreter (which the kernel tests
    # switch on for the whole test process) `--expert-compute triton` would legitimately start.
    env.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=work)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:  # run() killed it
        code, out, err = None, _text(e.stdout), _text(e.stderr)
    result = Result(case, code, time.monotonic() - start, err, out)
    lines = [line for line in err.splitlines() if line.strip()]
    if code is None:
        result.problems.append(f"still running after {timeout:.0f} s")
    elif code != 2:
        result.problems.append(f"exit code {code}, not 2")
    if len(lines) != 1:
        result.problems.append(f"{len(lines)} lines on stderr, not 1")
    if "Traceback" in err:
        result.problems.append("a traceback on stderr")
    if "moe-rt: serving" in out:
        result.problems.append("printed the serving line")
    return result


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_cases(cases: list[Case], model: Path, *, jobs: int = 2, timeout: float = 120.0) -> list[Result]:
    """Run `cases` against `model` (copied, never modified) with a port held busy for the
    'port already in use' case; results in case order."""
    with tempfile.TemporaryDirectory(prefix="moe-rt-startup-") as tmp, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(run_case, c, model, Path(tmp), port, timeout) for c in cases]
            return [f.result() for f in futures]


def table(results: list[Result]) -> str:
    w = max(len(r.case.name) for r in results)
    rows = [f"{'case':<{w}}  {'exit':>4}  {'s':>5}  {'ok':<4}  stderr (first line) / problems"]
    for r in results:
        first = next((line for line in r.stderr.splitlines() if line.strip()), "")
        why = "; ".join(r.problems) if r.problems else first
        rows.append(f"{r.case.name:<{w}}  {str(r.code):>4}  {r.seconds:5.1f}  {'yes' if r.ok else 'NO':<4}  {why[:150]}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder to break copies of (default: the shipped demo model)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take")
    p.add_argument("--only", help="comma-separated substrings: run the cases whose name contains one")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else ROOT / "moe_rt" / "demo_model"
    cuda = cuda_available()
    cases = [c for c in CASES if not (c.needs_cpu_only and cuda)]
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.name for k in keys)]
    results = run_cases(cases, model, jobs=args.jobs, timeout=args.timeout)
    print(table(results))
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"\n--- {r.case.name}: stderr (last 2000 characters) ---\n{r.stderr[-2000:]}")
    skipped = len(CASES) - len(cases) if not args.only else 0
    print(f"\n{len(results)} kinds of start-up failure tried, {len(results) - len(bad)} failed well "
          f"(one line, exit 2, no serving line), {len(bad)} did not"
          + (f"; {skipped} skipped (need a machine without CUDA)" if skipped else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
