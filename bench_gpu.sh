#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md in one command: the tests first (on a GPU they include the CUDA-graph
# sampler against the reference path), then bench.py's figures on random-3b. Each step has its own
# time limit, so one that fails or hangs leaves the others' results; each writes OUT_DIR/<step>.log.
#
#   bash bench_gpu.sh [OUT_DIR]          # PYTHON=... to pick the interpreter
set -u
out=${1:-bench_gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s)"
    grep -v "^|---" "$out/$name.log" | tail -n 30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step tests 90 "$python" -m pytest -q -x -p no:cacheprovider tests/test_fast_decode.py tests/test_model.py
step sampler_grpo 170 "$python" bench.py --model random-3b --only sampler,grpo --repeats 1 --no-greedy \
    --json "$out/sampler_grpo.json"
step memory_full 80 "$python" bench.py --model random-3b --only memory --memory-runs " "
step memory_lora 60 "$python" bench.py --model random-3b --only memory --memory-runs "--lora-rank 16"
step selfplay_lora 110 "$python" bench.py --model random-3b --only selfplay --selfplay-flags "--lora-rank 16"
step memory_lora_half 60 "$python" bench.py --model random-3b --only memory \
    --memory-runs "--lora-rank 16 --sampling-batch-size 4"
