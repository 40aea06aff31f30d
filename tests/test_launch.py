"""scripts/launch.sh (train.py through `accelerate launch`, one copy per Slurm node) in its single-node form: two
CPU processes (gloo), the mixed precision of an `accelerate config` file counted when the Hydra one is auto."""
import json
import os
import subprocess

import pytest
import torch

from helpers import ROOT, free_port, needs_data
from vit_gka.train.distributed import _mixed_precision

ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
mixed_precision: bf16
num_machines: 1
num_processes: 2
use_cpu: true
"""


@needs_data
def test_launch_script_two_processes_with_accelerate_configs_precision(tmp_path):
    home = tmp_path / 'hf_home'  # accelerate reads <HF_HOME>/accelerate/default_config.yaml
    (home / 'accelerate').mkdir(parents=True)
    (home / 'accelerate' / 'default_config.yaml').write_text(ACCELERATE_CONFIG)
    run_dir = tmp_path / 'run'
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'ACCELERATE_'))}
    env.update(HF_HOME=str(home), NPROC='2', MAIN_PROCESS_PORT=str(free_port()))
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'launch.sh'), 'epochs=1', 'train_subset=128',
                           'data.eval_subset=32', 'batch_size=16', 'workers=0', 'progress=false',
                           'model.args.depth=1', f'hydra.run.dir={run_dir}'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'global batch 32 = 16 per process x 2 processes' in proc.stdout + proc.stderr
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['mixed_precision'] == 'bf16' and results['global_batch_size'] == 32


@pytest.mark.parametrize('hydra, launched, expect', [
    ('auto', None, 'bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'no'),
    ('auto', 'fp16', 'fp16'),   # accelerate launch --mixed_precision fp16 / its config file
    ('auto', 'no', 'no'),       # accelerate's default when nothing was configured: not a choice
    ('no', 'bf16', 'no'),       # the Hydra setting, when given, wins
])
def test_auto_precision_follows_accelerate_launch(monkeypatch, hydra, launched, expect):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    if launched is not None:
        monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', launched)
    assert _mixed_precision(hydra) == expect
