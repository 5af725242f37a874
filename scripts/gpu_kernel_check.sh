#!/usr/bin/env bash
# On a GPU machine: the fused-MoE CUDA kernel tests, tuning tables, and `bench kernel`, in stages that
# each fit one 10-minute device call. Results land in $OUT (default runs/gpu/), tuned tables also
# in moe_rt/kernels/configs/ (copy them back into the repo and commit them).
#
#   scripts/gpu_kernel_check.sh tests          # pytest -m cuda tests/kernels (correctness first)
#   scripts/gpu_kernel_check.sh tune-mixtral   # E=8,  I=14336, D=4096, K=2, bf16  (168 compiles)
#   scripts/gpu_kernel_check.sh tune-qwen      # E=60, I=1408,  D=2048, K=4, bf16  (104 compiles)
#   scripts/gpu_kernel_check.sh bench          # moe-rt bench kernel, table and JSON
#   scripts/gpu_kernel_check.sh all            # all four, in that order
#
# Runs from the repo root with whatever python3 holds torch+triton there (no venv needed: the
# kernel path imports only torch, triton, tqdm; the tests also import safetensors). To run a
# bench against tables tuned in an earlier call, pass them back in (e.g. name the folder in carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage_tests() {
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
    $PY -m pytest -q -p no:cacheprovider -m cuda tests/kernels 2>&1 | tee "$OUT/pytest_cuda.txt"
}
tune() {  # experts inter hidden topk
    $PY -m moe_rt.kernels.tune --experts "$1" --inter "$2" --hidden "$3" --topk "$4" --dtype bf16 \
        --batch-sizes 1,16,64,256 2>&1 | grep -v '^  skip' | tee -a "$OUT/tune.txt"
    cp moe_rt/kernels/configs/E="$1",N="$2",*.json "$OUT/" 2>/dev/null || true
}
stage_bench() {
    $PY -m moe_rt_app.bench.kernel --json-out "$OUT/bench_kernel.json" 2>&1 | tee "$OUT/bench_kernel.txt"
}

case "${1:-all}" in
    tests) stage_tests ;;
    tune-mixtral) tune 8 14336 4096 2 ;;
    tune-qwen) tune 60 1408 2048 4 ;;
    bench) stage_bench ;;
    all) stage_tests; tune 8 14336 4096 2; tune 60 1408 2048 4; stage_bench ;;
    *) echo "usage: $0 tests|tune-mixtral|tune-qwen|bench|all" >&2; exit 2 ;;
esac
