"""Compile the fused-MoE kernels for a real GPU target on a machine without one.

    python -m moe_rt.kernels.aot_check                  # sm_90 (H100/H200), default configs, bf16/fp16/fp32
    python -m moe_rt.kernels.aot_check --space tuner    # every config the tuner would try
    python -m moe_rt.kernels.aot_check --json
    python -m moe_rt.kernels.aot_check --dtypes bf16-w8,bf16-w4   # bf16 activations, int8 / int4 experts

The CPU interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not whether Triton
can lower them for a GPU: tile shapes the tensor cores reject, shared memory past the SM's limit,
register spills, a construct the interpreter accepts and the compiler does not. Triton's NVIDIA
backend ships ptxas and cuobjdump, so the full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
runs here and the cubin's resource usage can be read back. Nothing is launched.

Must run without TRITON_INTERPRET (the interpreter replaces the kernels at decoration time): a
test calls this module in a subprocess with that variable removed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_rt.kernels import align_triton, fused_moe
from moe_rt.kernels.align import max_padded_len
from moe_rt.kernels.tune import candidate_configs
from moe_rt.kernels.tuning import default_config

# Hopper: 227 KiB of shared memory per block at most (cudaFuncAttributeMaxDynamicSharedMemorySize).
MAX_SHARED = {90: 232448, 80: 166912, 89: 101376}
TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
SHAPES = {"mixtral": (8, 14336, 2), "qwen": (60, 1408, 4)}  # experts, inter, top_k (as bench kernel)
BATCHES = (1, 16, 64, 256)


@dataclass
class Result:
    kernel: str
    dtype: str
    config: dict
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread: > 0 means registers spilled
    shared_bytes: int = 0  # dynamic shared memory the launch needs
    tensor_core: str = ""  # "wgmma" (Hopper warpgroup MMA), "mma" (mma.sync), or "" (none)


def _gemm_signature(kernel: str, dt: str, bits: int) -> dict:
    """Argument types in the kernel's order; bits 8 / 4: quantized weights with fp32 scales and zeros."""
    w = {16: f"*{dt}", 8: "*i8", 4: "*u8"}[bits]
    q = "*fp32" if bits < 16 else w  # full precision passes the weights for the unread scales
    sig = ({"x_ptr": f"*{dt}", "w13_ptr": w, "s13_ptr": q, "z13_ptr": q, "inter_ptr": f"*{dt}"} if kernel == "gate_up"
           else {"inter_ptr": f"*{dt}", "w2_ptr": w, "s2_ptr": q, "z2_ptr": q, "out_ptr": "*fp32",
                 "weights_ptr": "*fp32"})
    sig.update({"sorted_ids_ptr": "*i32", "block_slot_ptr": "*i32"})
    ints = ["num_pairs", "L", "D", "I"] + {
        "gate_up": ["stride_xt", "stride_xd", "stride_ws", "stride_wn", "stride_wd", "stride_ss", "stride_sn",
                    "stride_ip", "stride_ii"],
        "down": ["stride_ip", "stride_ii", "stride_ws", "stride_wd", "stride_wi", "stride_ss", "stride_sn",
                 "stride_op", "stride_od"]}[kernel]
    sig.update({name: "i32" for name in ints})
    return sig


def _compile(fn, signature: dict, constexprs: dict, launch: dict, arch: int):
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) of the cubin's one function, read with Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check(kernel: str, dtype: str, config: dict, arch: int) -> Result:
    launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    try:
        if kernel == "align":
            sig = {"ids_ptr": "*i64", "sorted_ptr": "*i32", "block_slot_ptr": "*i32", "num_padded_ptr": "*i32",
                   "num_pairs": "i32", "num_slots": "i32", "num_blocks": "i32"}
            k = _compile(align_triton._align_kernel, sig, dict(config["constexprs"]), launch, arch)
        else:
            fn = fused_moe._gate_up_kernel if kernel == "gate_up" else fused_moe._down_kernel
            act, _, wbits = dtype.partition("-w")  # "bf16-w4": bf16 activations, int4 experts
            bits = int(wbits or 16)
            consts = {"BLOCK_M": config["BLOCK_SIZE_M"], "BLOCK_N": config["BLOCK_SIZE_N"],
                      "BLOCK_K": config["BLOCK_SIZE_K"], "GROUP_M": config["GROUP_SIZE_M"],
                      "UPCAST": False, "PRECISION": "ieee" if act == "fp32" else None,
                      "BITS": bits, "QGROUP": 64 if bits < 16 else 1}
            if kernel == "gate_up":
                consts["TOP_K"] = 2  # only divides pair ids into token ids: no effect on tiles or resources
            k = _compile(fn, _gemm_signature(kernel, TRITON_DTYPES[act], bits), consts, launch, arch)
    except Exception as exc:  # noqa: BLE001 - any compile failure is the finding we report
        return Result(kernel, dtype, config, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    regs, local = _resources(k.asm["cubin"])
    ptx = k.asm["ptx"]
    core = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else ""
    shared = int(getattr(k.metadata, "shared", 0))
    res = Result(kernel, dtype, config, True, registers=regs, spill_bytes=local, shared_bytes=shared, tensor_core=core)
    if shared > MAX_SHARED.get(arch, MAX_SHARED[90]):
        res.ok, res.error = False, f"needs {shared} bytes of shared memory (sm_{arch} allows {MAX_SHARED[arch]})"
    return res


def configs_for(space: str) -> list[dict]:
    """Distinct GEMM launch configs: the defaults the launcher falls back to, or the tuner's space."""
    seen, out = set(), []
    for experts, _, top_k in SHAPES.values():
        for t in BATCHES:
            for cfg in ([default_config(t, top_k, experts)] if space == "default"
                        else candidate_configs(t, top_k, experts)):
                key = tuple(sorted(cfg.items()))
                if key not in seen:
                    seen.add(key)
                    out.append(dict(cfg))
    return out


def align_configs() -> list[dict]:
    """The align kernel's launch for each benchmarked shape at its largest batch, as the launcher picks it."""
    out = []
    for experts, _, top_k in SHAPES.values():
        pairs = max(BATCHES) * top_k
        params = align_triton.launch_params(pairs, experts, max_padded_len(pairs, experts, 16) // 16)
        warps = params.pop("num_warps")
        out.append({"num_warps": warps, "num_stages": 3, "constexprs": {"BLOCK_M": 16, **params}})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_rt.kernels.aot_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int: 90 = H100/H200, 80 = A100")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--space", choices=("default", "tuner"), default="default")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    dtypes = [d for d in args.dtypes.split(",") if d]
    jobs = [(k, d, c) for d in dtypes for k in ("gate_up", "down") for c in configs_for(args.space)]
    jobs += [("align", "i32", c) for c in align_configs()]
    results = [check(k, d, c, args.arch) for k, d, c in tqdm(jobs, desc=f"compile sm_{args.arch}",
                                                              unit="kernel", file=sys.stderr)]
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"arch": args.arch, "space": args.space, "results": [asdict(r) for r in results]}, indent=1))
    else:
        for r in results:
            cfg = r.config.get("constexprs", r.config)
            print(f"{r.kernel:<8}{r.dtype:<8}{'ok' if r.ok else 'FAIL':<5}regs {r.registers:>3} spill {r.spill_bytes:>4} "
                  f"smem {r.shared_bytes:>6} {r.tensor_core or '-':<6} {cfg} {r.error}")
        print(f"{len(results) - len(failed)}/{len(results)} compiled for sm_{args.arch}")
    return 1 if failed and args.space == "default" else 0


if __name__ == "__main__":
    sys.exit(main())
