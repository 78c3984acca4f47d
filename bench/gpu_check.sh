#!/usr/bin/env bash
# The GPU checks that docs/RESULTS.md ("On a GPU") still lacks, in one run of under ten minutes on one GPU: the CUDA
# tests (bf16 and CUDA paths), then the benchmarks whose GPU figures are missing or stale (issue 28's ratios at the
# Qwen2.5-1.5B shape), most wanted first.
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

# Limits sum to 560 s: what the device tool's 10-minute command limit leaves after start-up. Most wanted first: the
# CUDA tests, then issue 28's three ratios at a realistic shape (Qwen2.5-1.5B's, random weights built on the GPU in
# bf16: bench/common.py MODEL_SHAPES), then bench.memory's CUDA peak, then the block size of the top-k. A step
# stopped at its limit still leaves in the log what it printed.
Q15=qwen2.5-1.5b-shape
step cuda-tests 130 $PY -m pytest -q -p no:cacheprovider tests/bitnet/test_cuda.py tests/storage/test_cache.py tests/pipeline/test_teacher_forward.py -k cuda
# the Triton BitLinear compiled for this GPU against the eager path (BITNET_KERNEL=triton; the CPU runs it in Triton's
# interpreter)
step triton-tests 40 $PY -m pytest -q -p no:cacheprovider tests/bitnet/test_triton_bitlinear.py
# cache stage / bare forward, all 28 layers, 16-row chunks: one cached layer (the last) with top-32 logits, then
# three cached layers
step cache-1layer 80 $PY -m bench.cache_overhead --teachers $Q15 --large-rows 512 --layers -1 --no-sizes \
    --writer-threads 4 8 --topk-codecs blosc:lz4:bitshuffle --out "$OUT_DIR/cache_overhead_${Q15}_1layer.json"
step cache-3layers 60 $PY -m bench.cache_overhead --teachers $Q15 --large-rows 512 --layers 9 18 -1 --no-sizes \
    --writer-threads 4 --topk-codecs blosc:lz4:bitshuffle --out "$OUT_DIR/cache_overhead_${Q15}_3layers.json"
# BitLinear / nn.Linear training step under bf16 autocast: the superposition student at the 1.5B shape (28 blocks,
# width 1536, MLP 8960, vocabulary 151,936), every variant on one shared model (about 30 GB with AdamW state); the
# Triton kernels as a further variant, compiled and autotuned in the untimed warm-up round
step train-step 100 $PY -m bench.train_step --shapes $Q15 --parts bitlinear --large-batch 8 --seq-len 512 \
    --out "$OUT_DIR/train_step_${Q15}.json"
# training from the cache / from memory, a student 1024 wide with 8 blocks, on the 1.5B shape's cached last layer
step cache-read 60 $PY -m bench.cache_read --teachers $Q15 --student-dim 1024 --student-layers 8 \
    --topk-codecs blosc:lz4:bitshuffle --out "$OUT_DIR/cache_read_${Q15}.json"
# bench.memory starts a fresh process per configuration (each pays CUDA's start-up) and prints each peak as it ends
step memory 70 $PY -m bench.memory --teachers large --batch 8 --configs two-model "dual lora" "dual full" \
    "two-model, checkpointed" "dual lora, checkpointed" --out "$OUT_DIR/memory_batch8.json"
step topk_blocks 20 $PY -m bench.topk_blocks --rows 16384 --block-rows 256 1024 4096 \
    --out "$OUT_DIR/topk_blocks.json"
# Left out for time (each ran before or needs no GPU figure first): the quickstart/large cache_overhead and
# train_step, bench.memory at batch 32, bench.fp16_loss_scaling (20 s).

{ echo "===== summary"; printf '%s\n' "${summary[@]}"; } >> "$LOG"
