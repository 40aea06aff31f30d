#!/usr/bin/env bash
# Every GPU step of the README in one command, no edits needed (one CUDA GPU):
#   bash benchmarks/gpu.sh [OUT_DIR] [STEP ...]     # default OUT_DIR: benchmarks/results/gpu-<date>; STEPs: all
# Steps, in this order (logs to OUT_DIR/<step>*.log, numbers to OUT_DIR/*.json):
#   env     the device, driver and versions
#   check   the GPU tests (pytest -m gpu)
#   tests   the whole test suite on this machine (pytest-xdist when installed)
#   train   the DeiT recipe (bf16, torch.compile) on Fashion-MNIST written as 224 x 224 JPEGs, GKA-S and DeiT-S,
#           3 epochs (234 optimizer steps each; EPOCHS=n); then eval.py reloads each run's model/ and reports its top-1
#   core    attention core and layer: N = 197, 577, 4097, 16385, full and with a 2-D window of radius 7,
#           inference and training, time and peak memory, each SDPA kernel pinned, the kernels each call runs
#   kernel  the Triton GKA operator (impl=triton): core forward / backward vs sdpa_pad and the no-bias SDPA ceiling at
#           N = 197 ... 16385 (+ 2-D window r = 7), models GKA-Ti/S/B vs DeiT eager (S also compiled), pytest -m gpu
#           of its tests (python -m benchmarks.gka_triton --help)
#   models  whole models Ti / S / B, GKA vs DeiT interleaved: inference images/s at batch 128 ... 1024, training
#           images/s and peak memory at batch 128 (eval.py bench=true), eager and torch.compile'd
#           (environment, empty for none: SIZES="tiny small base", INFER_BATCHES="128 256 512 1024",
#           COMPILE="false true")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
shift || true
STEPS=${*:-env check tests train core kernel models}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device; this script measures the GPU numbers (CPU: python -m benchmarks.attention)")'
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" -c 'import torch, timm, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__, "accelerate", accelerate.__version__, torch.cuda.get_device_name())'
}

step_check() { "$PY" -m pytest -q -m gpu -p no:cacheprovider; }

step_tests() {
    local parallel=()
    "$PY" -c 'import xdist' 2>/dev/null && parallel=(-n 8)
    "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}"
}

step_train() {
    local data="$OUT/fmnist224"
    [ -d "$data" ] || "$PY" -m benchmarks.fmnist_folder "$data" --size 224 --train-per-class 1000 --val-per-class 100
    for model in gka deit; do
        "$PY" train.py recipe=deit model=$model shape=small data=folder data.root="$data" epochs=${EPOCHS-3} batch_size=128 \
            sched.warmup_epochs=1 workers=12 progress=false hydra.run.dir="$OUT/train_${model}_small"
        "$PY" eval.py run="$OUT/train_${model}_small" workers=12
    done
}

step_core() {
    "$PY" -m benchmarks.attention --device cuda --dtype bfloat16 --seqs 197 577 4097 16385 --windows 7 --train \
        --core-batch-tokens 32768 --sdpa-kernels --profile --models --out "$OUT/core.json"
}

step_kernel() {
    "$PY" -m benchmarks.gka_triton --out "$OUT/kernel.json"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gka_triton.py
}

step_models() {
    for size in ${SIZES-tiny small base}; do
        for batch in ${INFER_BATCHES-128 256 512 1024}; do
            "$PY" eval.py model_name=gka_deit_${size}_patch16_224 bench=true bench_cfg.train=false \
                bench_cfg.batch_size=$batch hydra.run.dir="$OUT/infer_${size}_b${batch}"
        done
        for compiled in ${COMPILE-false true}; do
            "$PY" eval.py model_name=gka_deit_${size}_patch16_224 bench=true bench_cfg.batch_size=128 \
                bench_cfg.compile=$compiled hydra.run.dir="$OUT/train_${size}_b128_compile_${compiled}"
        done
    done
}

for step in $STEPS; do
    declare -F "step_$step" >/dev/null || { echo "error: unknown step '$step' (env check tests train core kernel models)" >&2; exit 2; }
    echo "=== $step ($(date -u +%H:%M:%S))"
    "step_$step" 2>&1 | tee "$OUT/$step.log"
done
echo "-> $OUT"
