#!/usr/bin/env bash
# moe-rt on a bare GPU image (python3 holding its own torch and triton, no network), in one call.
#
#   scripts/gpu_run.sh wheels    # HERE, where the package registry answers: the wheels the image
#                                # lacks (pydantic, fastapi, uvicorn, ...) into .whl/ (~3 MB)
#   scripts/gpu_run.sh all       # THERE (carry .whl): install, then every stage below
#   scripts/gpu_run.sh env|tests|e2e|bench|tune
#
# moe-rt is never pip-installed there: its own pins (torch==2.13.0, triton==3.7.1) would replace
# the image's CUDA builds. The carried wheels go to /tmp/site with --no-deps and the checkout is
# put on PYTHONPATH, so the image's torch, triton, numpy, safetensors and tokenizers are used.
# Stages write their logs to $OUT (default runs/gpu/); each fits well inside a 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
        annotated-doc==0.0.7 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0)
MOE="$PY -m moe_rt_app.cli.main"

stage_wheels() {  # here: cp312 manylinux wheels for the image's Python 3.12
    mkdir -p .whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls .whl
}

install() {  # there: the carried wheels beside the image's packages
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "gpu_run: installing the carried wheels failed" >&2; exit 1; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
}

stage_env() {
    $PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton, pydantic, fastapi
print("torch", torch.__version__, "triton", triton.__version__, "pydantic", pydantic.VERSION, "fastapi", fastapi.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
import moe_rt_app.llm, server.app  # every package imports on the image's versions
print("moe-rt imports: ok")
EOF
}

stage_tests() {  # the CUDA-marked tests (kernels, device paths, CUDA-graph replay against eager)
    $PY -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.txt"
}

stage_e2e() {  # the demo model on the GPU: resident, offloaded behind the cache, fused Triton experts, CUDA graphs
    {
        for extra in "" "--offload cpu --expert-cache-slots 4" "--offload cpu --expert-cache-slots 4 --cache-policy predictive --predictor gate_lookahead" "--expert-compute triton" "--cuda-graphs"; do
            echo "== generate --device cuda --dtype bfloat16 $extra"
            # shellcheck disable=SC2086
            $MOE generate --device cuda --dtype bfloat16 --prompt "In the beginning" --max-tokens 32 \
                --temperature 0 --json $extra
        done
        echo "== generate --device cpu --dtype float32 (reference for the tokens above)"
        $MOE generate --device cpu --dtype float32 --prompt "In the beginning" --max-tokens 32 --temperature 0 --json
    } 2>&1 | tee "$OUT/e2e.txt"
}

stage_bench() {  # each figure beside its baseline from the same run (transformers, the per-expert loop)
    $MOE bench decode --synthetic mixtral-gpu --cache-dir /tmp/moe-rt-synthetic --device cuda --dtype bfloat16 \
        --batch-sizes 1,16,64 --max-tokens 64 --repeats 3 --json 2>&1 | tee "$OUT/bench_decode_gpu.txt"
    # decode steps replayed from CUDA graphs beside eager ones (columns cuda_graphs_*, ratio to eager)
    $MOE bench decode --synthetic mixtral-gpu --cache-dir /tmp/moe-rt-synthetic --device cuda --dtype bfloat16 \
        --batch-sizes 1,16,64 --max-tokens 64 --repeats 3 --no-transformers --cuda-graphs \
        --json 2>&1 | tee "$OUT/bench_decode_cuda_graphs.txt"
    $MOE bench decode --device cuda --dtype bfloat16 --batch-sizes 1,16,64 --max-tokens 64 --repeats 3 \
        --json 2>&1 | tee "$OUT/bench_decode_demo.txt"
    $MOE bench kernel --json-out "$OUT/bench_kernel.json" 2>&1 | tee "$OUT/bench_kernel.txt"
    # GPU memory as the fast tier, pinned host RAM as the slow one: resident, naive, LRU, LRU with host
    # compute of misses (the rule decides), predictive with lookahead auto from event-timed copies and
    # layers, 2 prefetch copies on the stream at once (the rest cancellable; cancelled per row)
    $MOE bench offload --synthetic mixtral-gpu --cache-dir /tmp/moe-rt-synthetic --device cuda --dtype bfloat16 \
        --tier cpu --capacities 25,50 --predictors gate_lookahead --lookahead auto --cpu-compute-on-miss auto \
        --copies-in-flight 2 --max-tokens 32 --repeats 3 --no-progress \
        --json 2>&1 | tee "$OUT/bench_offload_gpu.txt"
}

stage_tune() {  # a short pass: Mixtral's expert shape at the batch sizes decode uses
    $PY -m moe_rt.kernels.tune --experts 8 --inter 14336 --hidden 4096 --topk 2 --dtype bf16 \
        --batch-sizes 1,16,64 2>&1 | grep -v '^  skip' | tee "$OUT/tune.txt"
    cp moe_rt/kernels/configs/E=8,N=14336,*.json "$OUT/" 2>/dev/null || true
}

case "${1:-all}" in
    wheels) stage_wheels ;;
    env) install; stage_env ;;
    tests) install; stage_tests ;;
    e2e) install; stage_e2e ;;
    bench) install; stage_bench ;;
    tune) install; stage_tune ;;
    all) install; stage_env && stage_tests; stage_e2e; stage_bench ;;
    *) echo "usage: $0 wheels|env|tests|e2e|bench|tune|all" >&2; exit 2 ;;
esac
