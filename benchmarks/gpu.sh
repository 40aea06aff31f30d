#!/usr/bin/env bash
# The GPU numbers of the README in one command (issue: GKA faster than DeiT on the GPU), no edits needed:
#   bash benchmarks/gpu.sh [OUT_DIR]            # default OUT_DIR: benchmarks/results/gpu-<date>
# On one CUDA GPU, bf16, GKA and DeiT interleaved in one process each time:
#   1. attention core and layer: N = 197, 577, 4097, 16385, full and with a 2-D window of radius 7,
#      inference and training, time and peak memory (benchmarks/attention.py);
#   2. whole models Ti / S / B, inference images/s at batch 64 ... 1024 (the best batch is the table's);
#   3. whole models Ti / S / B, training steps at batch 128: images/s and peak memory (eval.py bench=true).
# Every table goes to stdout and OUT_DIR/*.log, the numbers to OUT_DIR/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device; this script measures the GPU numbers (CPU: python -m benchmarks.attention)")'
mkdir -p "$OUT"

"$PY" -m benchmarks.attention --device cuda --dtype bfloat16 --seqs 197 577 4097 16385 --windows 7 --train \
    --models --out "$OUT/attention.json" | tee "$OUT/attention.log"

for size in tiny small base; do
    gka=gka_deit_${size}_patch16_224
    for batch in 64 128 256 512 1024; do
        "$PY" eval.py model_name=$gka bench=true bench_cfg.train=false bench_cfg.batch_size=$batch \
            hydra.run.dir="$OUT/infer_${size}_b${batch}" | tee "$OUT/infer_${size}_b${batch}.log"
    done
    "$PY" eval.py model_name=$gka bench=true bench_cfg.train=true bench_cfg.batch_size=128 \
        hydra.run.dir="$OUT/train_${size}_b128" | tee "$OUT/train_${size}_b128.log"
done
echo "-> $OUT"
