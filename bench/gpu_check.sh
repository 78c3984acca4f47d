#!/usr/bin/env bash
# The GPU checks that docs/RESULTS.md ("On a GPU") still lacks, in one run of under ten minutes on one GPU: the CUDA
# tests (bf16 and CUDA paths), then the benchmarks whose GPU figures are missing or stale, most wanted first.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# OUT_DIR (default $OUT if set, else bench/results/gpu) receives one JSON per benchmark and gpu_check.log: every
# step's output and a summary line per step (exit status, seconds). Each step has its own time limit, and a failing
# step does not stop the next. PYTHON picks the interpreter (default python3). The interpreter needs the project's
# dependencies (or PYTHONPATH pointing at them); on a host without internet, install wheels downloaded elsewhere.
set -u

OUT_DIR=${1:-${OUT:-bench/results/gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY: these checks are for a GPU host" | tee -a "$LOG"
    exit 1
fi
$PY -c "import torch, transformers; print('GPU', torch.cuda.get_device_name(), '| torch', torch.__version__,
'| transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

summary=()
step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output into the log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "===== $name (limit ${limit}s): $*" >> "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    summary+=("$(printf '%-15s exit %-3s %4ss%s' "$name" "$rc" "$((SECONDS - start))" \
        "$([ "$rc" = 124 ] && echo ' (time limit)')")")
    echo "${summary[-1]}"
}

# Limits sum to 560 s: what the device tool's 10-minute command limit leaves after start-up. bench.memory starts a
# fresh process per configuration and batch (each pays CUDA's start-up), so it runs as two steps with a JSON each,
# and prints each configuration's peak as it ends: a step stopped at its limit still leaves those in the log.
step cuda-tests 130 $PY -m pytest -q -p no:cacheprovider tests/bitnet/test_cuda.py tests/storage/test_cache.py tests/pipeline/test_teacher_forward.py -k cuda
step cache_overhead 100 $PY -m bench.cache_overhead --rows 512 --large-rows 256 --no-sizes \
    --out "$OUT_DIR/cache_overhead.json"
step train_step 70 $PY -m bench.train_step --batch 64 --large-batch 32 --out "$OUT_DIR/train_step.json"
step memory-batch8 90 $PY -m bench.memory --teachers large --batch 8 --configs two-model "dual lora" "dual full" \
    "dual full, AdamW8bit" "two-model, checkpointed" "dual lora, checkpointed" --out "$OUT_DIR/memory_batch8.json"
step memory-batch32 75 $PY -m bench.memory --teachers large --batch 32 --configs two-model "dual lora" \
    "two-model, checkpointed" "dual lora, checkpointed" --out "$OUT_DIR/memory_batch32.json"
step cache_read 55 $PY -m bench.cache_read --out "$OUT_DIR/cache_read.json"
step topk_blocks 20 $PY -m bench.topk_blocks --rows 16384 --block-rows 256 1024 4096 \
    --out "$OUT_DIR/topk_blocks.json"
step fp16_scaling 20 $PY -m bench.fp16_loss_scaling --out "$OUT_DIR/fp16_loss_scaling.json"

{ echo "===== summary"; printf '%s\n' "${summary[@]}"; } >> "$LOG"
