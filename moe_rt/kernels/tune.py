"""Tune the fused MoE launch config on this GPU and write the table beside the kernel.

    python -m moe_rt.kernels.tune --experts 8 --inter 14336 --hidden 4096 --dtype bf16 \
        --batch-sizes 1,16,64,256 [--topk 2] [--out-dir DIR]

For each batch size T it times every candidate config on random router-like choices (the whole
fused_experts call, which is what serving pays) and keeps the fastest. The file name comes from
tuning.config_file_name, the same function the reader uses. Entries for batch sizes not tuned in
this run are kept when the file already exists.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from moe_rt.kernels.tuning import CONFIG_DIR, config_file_name, device_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def candidate_configs(num_tokens: int, top_k: int, num_experts: int) -> list[dict]:
    """The search space, pruned so that one shape tunes in minutes (each config is a compile).

    - BLOCK_SIZE_M above ~2x the mean rows per expert is pure padding.
    - GROUP_SIZE_M only reorders programs across row blocks; with one block per expert (decode)
      it cannot matter, so it is searched only when an expert has several row blocks.
    - BLOCK_SIZE_K = 256 and BLOCK_SIZE_N = 32 are tried only for 16-row blocks. At decode sizes
      the step is a weight stream and what matters is enough programs in flight: Mixtral's down
      projection at T=1 has only 2 experts x D/N column blocks (128 programs for N=64 on a
      132-SM H100). For taller blocks N=32 starves the tensor cores.
    """
    rows = num_tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m == 16 or m <= 2 * rows]
    groups = (1, 16) if rows > 16 else (1,)
    out = []
    for m in block_ms:
        block_ns, block_ks = ((32, 64, 128), (64, 128, 256)) if m == 16 else ((64, 128), (64, 128))
        for n, k, g, w, s in itertools.product(block_ns, block_ks, groups, (4, 8), (3, 4)):
            out.append({"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": g,
                        "num_warps": w, "num_stages": s})
    return out


def tune_batch(num_tokens: int, args: argparse.Namespace, w13: torch.Tensor, w2: torch.Tensor) -> tuple[dict, float]:
    """Fastest (config, ms) for one batch size; configs that fail to compile or launch are skipped."""
    from moe_rt.kernels.fused_moe import fused_experts
    from moe_rt.kernels.timing import cuda_time_ms, random_routing

    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, args.hidden, generator=gen).to(w13)
    ids, weights = random_routing(num_tokens, args.experts, args.topk, "cuda", gen)
    from tqdm import tqdm

    best, best_ms = None, float("inf")
    candidates = candidate_configs(num_tokens, args.topk, args.experts)
    for cfg in tqdm(candidates, desc=f"tune T={num_tokens}", unit="cfg", file=sys.stderr):
        try:
            ms = cuda_time_ms(lambda: fused_experts(hidden, w13, w2, ids, weights, config=cfg),
                              warmup=2, iters=args.iters)
        except Exception as exc:  # noqa: BLE001 - e.g. triton OutOfResources for a big tile
            print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no candidate config ran for T={num_tokens}")
    return best, best_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_rt.kernels.tune", description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, required=True, help="slots in the weight stack (S, the table's E)")
    p.add_argument("--inter", type=int, required=True, help="expert intermediate size I (the table's N)")
    p.add_argument("--hidden", type=int, required=True, help="hidden size D")
    p.add_argument("--topk", type=int, default=2, help="experts per token K")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated token counts T")
    p.add_argument("--iters", type=int, default=10, help="timed calls per candidate (median kept)")
    p.add_argument("--out-dir", type=Path, default=CONFIG_DIR, help="where the table is written")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_rt.kernels.tune: no CUDA GPU found; tables can only be measured on a GPU", file=sys.stderr)
        return 2
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")

    from moe_rt.kernels.timing import random_expert_weights

    w13, w2 = random_expert_weights(args.experts, args.hidden, args.inter, DTYPES[args.dtype], "cuda")
    path = args.out_dir / config_file_name(args.experts, args.inter, device_name(w13.device), args.dtype)
    table = json.loads(path.read_text()) if path.is_file() else {}
    for t in batch_sizes:
        cfg, ms = tune_batch(t, args, w13, w2)
        print(f"T={t}: {ms:.3f} ms with {cfg}")
        table[str(t)] = cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: table[k] for k in sorted(table, key=int)}
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
