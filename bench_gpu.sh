#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md in one command: the tests first (on a GPU they include the CUDA-graph
# sampler against the reference path), then bench.py's figures on random-3b. Each step has its own
# time limit, so one that fails or hangs leaves the others' results; each writes OUT_DIR/<step>.log.
#
#   bash bench_gpu.sh [OUT_DIR [STEP ...]]     # PYTHON=... picks the interpreter
#
# Steps (all by default): tests sampler_grpo memory grpo_no_checkpointing grpo_micro_batches_of_8 selfplay_lora.
# selfplay_lora writes ~30 GB of checkpoints to the temporary folder. Not by default: memory_large_images,
# the memory figure with 1792 x 1792 images: 4,096 image tokens a prompt instead of 361 (448 x 448
# images, raised to selfplay.py's 262,144-pixel minimum).
set -u
out=${1:-bench_gpu}
shift $(($# > 0 ? 1 : 0))
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s)"
    grep -v -e "^|---" -e "^----" -e "^USDT" "$out/$name.log" | tail -n 60
}

bench=("$python" tools/bench.py --model random-3b)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests sampler_grpo memory grpo_no_checkpointing grpo_micro_batches_of_8 selfplay_lora)
for name in "${steps[@]}"; do
    case $name in
    tests) step tests 90 "$python" -m pytest -q -p no:cacheprovider tests/test_fast_decode.py tests/test_model.py ;;
    sampler_grpo) step sampler_grpo 180 "${bench[@]}" --only sampler,grpo --repeats 1 --no-greedy --profile grpo \
        --json "$out/sampler_grpo.json" ;;
    memory) step memory 150 "${bench[@]}" --only memory --json "$out/memory.json" ;;
    memory_large_images) step memory_large_images 150 "${bench[@]}" --only memory --image-size 1792 \
        --memory-runs " ;--lora-rank 16" --json "$out/memory_large_images.json" ;;
    grpo_no_checkpointing) step grpo_no_checkpointing 60 "${bench[@]}" --only grpo --repeats 1 \
        --no-gradient-checkpointing ;;
    grpo_micro_batches_of_8) step grpo_micro_batches_of_8 60 "${bench[@]}" --only grpo --repeats 1 \
        --micro-batch-tokens 4704 ;;  # 8 rows of 588 tokens: the GRPO figure as micro-batches of 8 rows
    selfplay_lora) step selfplay_lora 120 "${bench[@]}" --only selfplay --selfplay-flags "--lora-rank 16" ;;
    *) echo "unknown step: $name" && exit 2 ;;
    esac
done
