#!/usr/bin/env bash
# Fresh-machine setup: Debian's Fashion-MNIST (the embedded default data set) and a venv in .venv with the
# project installed editable (pip install -e '.[test,slurm,sweep]'), so `import vit_gka` works from any folder.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77'  # setuptools: wheel builds without isolation (tests)
.venv/bin/python -m pip install -q -e '.[test,slurm,sweep]'  # slurm: Hydra's submitit launcher (tests/test_submitit.py),
# sweep: the Optuna sweeper (tests/test_sweep_failures.py)
# The oldest timm requirements.txt admits, in a folder of its own (tests/test_oldest_timm.py reloads a run with it)
OLDEST_TIMM=$(sed -n 's/^timm>=\([0-9.]*\).*/\1/p' requirements.txt)
[ -f ".venv/oldest-timm/timm-$OLDEST_TIMM.dist-info/METADATA" ] || \
    .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/oldest-timm "timm==$OLDEST_TIMM"
