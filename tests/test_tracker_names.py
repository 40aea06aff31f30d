"""Trackers that compare the runs of a sweep: TensorBoard's hparams view holds each run's final top-1, EMA top-1 and
loss next to its hyperparameters (read back from the event files), and W&B (offline) files every job under the
sweep's project, named after the job."""
import glob
import importlib.util
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers import ROOT, needs_data, script

HAS_WANDB = importlib.util.find_spec('wandb') is not None
TINY = ['epochs=1', 'train_subset=64', 'data.eval_subset=32', 'batch_size=32', 'workers=0', 'progress=false',
        'model.args.depth=1', 'hydra.callbacks.report.num_images=4']


def _hparams_view(run_dir):
    """(metrics {tag: value}, hyperparameters {name: value}) of the run's TensorBoard hparams session."""
    events = EventAccumulator(os.path.join(run_dir, 'tb', 'hparams'))
    events.Reload()
    metrics = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()['scalars']}
    hparams, metric_infos = {}, []
    for content in events.PluginTagToContent('hparams').values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField('experiment'):
            metric_infos = [m.name.tag for m in data.experiment.metric_infos]
        if data.HasField('session_start_info'):
            hparams = {k: v.number_value if v.HasField('number_value') else v.string_value
                       for k, v in data.session_start_info.hparams.items()}
    assert sorted(metric_infos) == sorted(metrics)  # the view's metric columns are these scalars
    return metrics, hparams


@needs_data
def test_sweep_runs_compare_in_tensorboard_and_wandb(tmp_path):
    folder = tmp_path / 'lr_sweep'
    log_with = 'log_with=[tensorboard,wandb]' if HAS_WANDB else 'log_with=tensorboard'
    proc = script('train.py', ['-m', 'model=gka', 'shape=fmnist', 'lr=8e-3,4e-3', log_with, *TINY,
                               f'hydra.sweep.dir={folder}'], cwd=ROOT, timeout=600,
                  env={**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in (('0_gka_fmnist', 8e-3), ('1_gka_fmnist', 4e-3)):
        metrics, hparams = _hparams_view(folder / job)
        assert set(metrics) == {'hparams/top1', 'hparams/ema_top1', 'hparams/loss'}
        assert metrics['hparams/top1'] > 0 and hparams['lr'] == pytest.approx(lr)
        assert hparams['model_choice'] == 'gka_fmnist'
        if HAS_WANDB:  # the offline run's record holds the project (the sweep's name) and the job's name
            record = open(glob.glob(str(folder / job / 'wandb' / 'offline-run-*' / 'run-*.wandb'))[0], 'rb').read()
            assert b'lr_sweep' in record and f'gka_fmnist lr={lr}'.encode() in record
