"""The kernels compile for a real H100 (sm_90) target here, without a GPU: Triton's NVIDIA
backend and its bundled ptxas lower them to a cubin (moe_rt/kernels/aot_check.py).

This catches what the CPU interpreter cannot: tile shapes the tensor cores reject, shared memory
past the SM's limit, register spills, constructs only the interpreter accepts. It runs in a
subprocess because tests/kernels/conftest.py turns the interpreter on for this process.
"""
import json
import os
import subprocess
import sys

import pytest

from moe_rt.kernels.aot_check import MAX_SHARED


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "moe_rt.kernels.aot_check", "--arch", "90",
                           "--dtypes", "bf16,fp32,bf16-w8,bf16-w4", "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_every_default_config_compiles_for_sm90(report):
    results = report["results"]
    kernels = {r["kernel"] for r in results}
    assert kernels == {"gate_up", "down", "align"}
    bad = [(r["kernel"], r["dtype"], r["config"], r["error"]) for r in results if not r["ok"]]
    assert not bad


def test_sm90_cubins_fit_and_do_not_spill(report):
    for r in report["results"]:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} {r['dtype']} spills: {r}"
        assert r["shared_bytes"] <= MAX_SHARED[90], r


def test_half_precision_dots_use_tensor_cores(report):
    # bf16 products must lower to tensor-core MMA (mma.sync or Hopper wgmma), not FMA loops;
    # fp32 uses IEEE FMA on purpose (no silent tf32). Quantized experts (bf16-w8, bf16-w4) are
    # dequantised to bf16 tiles before the dot, so they keep the tensor cores.
    for r in report["results"]:
        if r["kernel"] in ("gate_up", "down"):
            if r["dtype"].startswith("bf16"):
                assert r["tensor_core"] in ("mma", "wgmma"), r
            else:
                assert r["tensor_core"] == "", r
