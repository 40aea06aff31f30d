"""Faults of a running training job on real data: weights that turn non-finite are never written, and the message
names a checkpoint that resumes."""
import os

import torch
from safetensors.torch import load_file

from helpers import TINY, check, needs_data, one_line_error, run

pytestmark = needs_data

# 2 updates an epoch: 64 images, batch 32
SHORT = [*TINY, 'train_subset=64', 'data.eval_subset=32', 'model.args.depth=1']


def test_nonfinite_weights_are_never_written_and_the_named_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / 'run'
    args = ['epochs=2', *SHORT, f'hydra.run.dir={run_dir}']
    # update 4, the last of epoch 2: the step makes a weight inf although its loss and gradient were finite
    proc = run(args, cwd=tmp_path, env={'VIT_GKA_TEST_NONFINITE': '4:weight'})
    last = run_dir / 'checkpoints' / 'last'
    one_line_error(proc, f'non-finite weights after update 4 (', code=3)
    assert f'the last good checkpoint is {last} (update 2)' in proc.stderr
    assert not (run_dir / 'results.json').exists() and not (run_dir / 'model').exists()
    assert not (run_dir / 'best.safetensors').exists()
    state = torch.load(last / 'state.pt', weights_only=True)
    assert state['num_updates'] == 2
    for name in ('model.safetensors', 'model_ema.safetensors'):
        assert all(torch.isfinite(v).all() for v in load_file(last / name).values())
    # the named checkpoint resumes, and the run finishes
    check(run([*args, 'resume=auto'], cwd=tmp_path))
    assert (run_dir / 'results.json').exists()
    assert all(torch.isfinite(v).all() for v in load_file(run_dir / 'model' / 'model.safetensors').values())
    assert os.path.isfile(run_dir / 'best.safetensors')
