"""Accelerate's trackers (``log_with``): TensorBoard in <run>/tb with the run's hyperparameters (hparams view) and
the training curves on the optimizer-update axis (loss, lr, gradient norm, images/s, data-wait share), the same
calls for any tracker the user installs; ``log_with=none`` writes none."""
import glob
import os

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import check, needs_data, run

SMALL = ['epochs=1', 'train_subset=128', 'data.eval_subset=32', 'batch_size=16', 'workers=0', 'progress=false',
         'model.args.depth=1', 'log_interval=2']


@needs_data
def test_tensorboard_has_hparams_and_training_curves(tmp_path):
    run_dir = tmp_path / 'run'
    check(run([*SMALL, 'seed=3', f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    events = EventAccumulator(str(run_dir / 'tb'))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()['scalars']}
    for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'train/data_wait_fraction', 'train/step_images_per_s'):
        assert [e.step for e in scalars[tag]] == [2, 4, 6, 8], tag  # every log_interval updates
    assert all(e.value > 0 for e in scalars['train/grad_norm'])
    assert [e.step for e in scalars['eval/top1']] == [8]  # epoch values at the epoch's last update
    hparams = glob.glob(str(run_dir / 'tb' / '*' / 'hparams.yml'))
    assert len(hparams) == 1
    values = yaml.safe_load(open(hparams[0]))
    assert values['seed'] == 3 and values['optim/opt'] == 'adamw' and values['model/name'] == 'gka_deit_tiny_patch16_224'


@needs_data
def test_no_tracker(tmp_path):
    run_dir = tmp_path / 'run'
    check(run([*SMALL, 'log_with=none', f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    assert not os.path.exists(run_dir / 'tb') and (run_dir / 'results.json').is_file()
