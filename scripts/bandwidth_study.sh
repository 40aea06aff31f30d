#!/usr/bin/env bash
# README "Beyond the paper: data-dependent bandwidths": the quickstart (shape=fmnist, recipe=quick, 6 epochs) with
# 3 seeds of GKA, per-query GKA (model=gka_q), per-key GKA (model=gka_k), a hybrid (GKA in blocks 0-2, timm's
# dot-product attention in blocks 3-5) and DeiT, then one table of every run with mean +- std per model.
#
#   bash scripts/bandwidth_study.sh                 # 15 runs, about an hour on a 2-core CPU
#   SEEDS=0 OUT=/tmp/study bash scripts/bandwidth_study.sh epochs=1    # a quick look
#
# Each sweep also writes its report (tables, plots: multirun/.../report) and runs.md / runs.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/bandwidth_study}
SEEDS=${SEEDS:-0,1,2}
"$PY" train.py -m model=gka,gka_q,gka_k,deit shape=fmnist "seed=$SEEDS" "hydra.sweep.dir=$OUT/models" "$@"
"$PY" train.py -m model=gka shape=fmnist '+model.args.gka_blocks=[0,1,2]' model_choice=gka_hybrid012_fmnist \
    "seed=$SEEDS" "hydra.sweep.dir=$OUT/hybrid" "$@"
"$PY" -m vit_gka.analysis.summary "$OUT/models" "$OUT/hybrid" | tee "$OUT/table.md"
