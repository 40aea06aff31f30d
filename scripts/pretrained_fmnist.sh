#!/usr/bin/env bash
# The shipped pretrained GKA (README "A pretrained GKA"): gka_deit_fmnist_patch7_28.vitgka_fmnist, the quickstart's
# GKA (model=gka shape=fmnist, recipe=quick) trained in two stages: 40 epochs with stochastic depth 0.1, then 20
# more from those weights (finetune=) with a quarter of the learning rate and no stochastic depth.
#
#   bash scripts/pretrained_fmnist.sh        # about 80 minutes on a 2-core CPU; OUT=<folder> to choose where
#
# Then copies the weights the second run's model/ holds (the EMA's or the raw model's, whichever scored higher)
# into the package (vit_gka/weights/) and evaluates them by name through timm, as a user would. Update
# FMNIST_TOP1 in vit_gka/models/gka_deit.py and the README with the top-1 it prints (tests/test_pretrained.py
# checks both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/pretrained}
"$PY" train.py model=gka shape=fmnist epochs=40 drop_path=0.1 seed=0 "hydra.run.dir=$OUT/gka_fmnist_e40" "$@"
"$PY" train.py model=gka shape=fmnist "finetune=$OUT/gka_fmnist_e40" epochs=20 lr=2.0e-3 drop_path=0.0 seed=1 \
    "hydra.run.dir=$OUT/gka_fmnist_e40_ft20" "$@"
"$PY" - "$OUT/gka_fmnist_e40_ft20" <<'PY'
import sys
from safetensors.torch import load_file, save_file
from vit_gka.models.gka_deit import FMNIST_WEIGHTS
weights = load_file(f'{sys.argv[1]}/model/model.safetensors')  # timm's key names (save_for_hf)
save_file(weights, FMNIST_WEIGHTS, metadata={'format': 'pt'})
print(f'{len(weights)} tensors -> {FMNIST_WEIGHTS}')
PY
"$PY" eval.py model_name=gka_deit_fmnist_patch7_28 workers=0 "out=$OUT"
