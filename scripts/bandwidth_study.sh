#!/usr/bin/env bash
# README "Beyond the paper: data-dependent bandwidths": the quickstart (shape=fmnist, recipe=quick, 6 epochs) with
# 3 seeds of GKA, per-query GKA (model=gka_q), per-key GKA (model=gka_k), a hybrid (GKA in blocks 0-2, timm's
# dot-product attention in blocks 3-5) and DeiT, then one table of every run with mean +- std per model.
#
#   bash scripts/bandwidth_study.sh                 # 15 runs, about 70 minutes on a 2-core CPU
#   SEEDS=0 OUT=/tmp/study bash scripts/bandwidth_study.sh epochs=1    # a quick look
#
# Seed by seed, so that a study cut short still compares every model on the seeds it finished. Each sweep also
# writes its report (tables, plots: <OUT>/seed<n>/report) and runs.md / runs.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/bandwidth_study}
SEEDS=${SEEDS:-0,1,2}
for seed in ${SEEDS//,/ }; do
    "$PY" train.py -m model=gka,gka_q,gka_k,deit shape=fmnist "seed=$seed" "hydra.sweep.dir=$OUT/seed$seed" "$@"
    "$PY" train.py -m model=gka shape=fmnist '+model.args.gka_blocks=[0,1,2]' model_choice=gka_hybrid012_fmnist \
        "seed=$seed" "hydra.sweep.dir=$OUT/seed${seed}_hybrid" "$@"
done
"$PY" -m vit_gka.analysis.summary "$OUT" | tee "$OUT/table.md"
