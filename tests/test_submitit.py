"""Hydra's submitit launcher, offline: ``hydra/launcher=submitit_local`` runs a sweep of two jobs, and a job sent
submitit's preemption signal (SIGUSR2) checkpoints at the next update, is requeued by submitit and, with
``resume=auto``, continues to the same steps and final weights as a run nobody interrupted. Needs the ``slurm``
extra (``hydra-submitit-launcher``; setup.sh installs it)."""
import glob
import json
import os
import signal
import subprocess

import pytest
from safetensors.torch import load_file

from helpers import TINY, check, finish, lines, needs_data, run, start, steps, wait_for

pytest.importorskip('hydra_plugins.hydra_submitit_launcher', reason="needs pip install '.[slurm]'")
pytestmark = needs_data

LOCAL = ['-m', 'hydra/launcher=submitit_local']
# long enough to be interrupted (64 updates, a checkpoint after each), short enough for CI
REQUEUE = ['model=gka', 'shape=fmnist', 'epochs=1', 'train_subset=1024', 'data.eval_subset=64', 'batch_size=16',
           'workers=0', 'progress=false', 'model.args.depth=2', 'checkpoint_every_steps=1', 'resume=auto']


def test_submitit_local_sweep_of_two_jobs(tmp_path):
    check(run([*LOCAL, 'model=gka,deit', 'shape=fmnist', 'epochs=1', *TINY, f'hydra.sweep.dir={tmp_path}/sweep'],
              cwd=tmp_path))
    for job in ('0_gka_fmnist', '1_deit_fmnist'):
        results = json.loads((tmp_path / 'sweep' / job / 'results.json').read_text())
        assert results['epochs_done'] == 1 and results['model_config'] == job.split('_', 1)[1]
    assert len(glob.glob(f'{tmp_path}/sweep/.submitit/*/*_result.pkl')) == 2  # two submitit jobs


def _job_process():
    """The running submitit job's process (under submitit's local controller, whose pid names the job)."""
    found = subprocess.run(['pgrep', '-f', 'submitit.core._submit'], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def test_requeued_job_continues_exactly(tmp_path):
    whole = tmp_path / 'whole'  # the same training, uninterrupted and without a launcher
    check(run([*REQUEUE, f'hydra.run.dir={whole}'], cwd=tmp_path))

    sweep = tmp_path / 'requeued'
    proc = start([*LOCAL, *REQUEUE, f'hydra.sweep.dir={sweep}'], tmp_path)
    job = sweep / '0_gka_fmnist'
    wait_for(lambda: lines(job / 'steps.jsonl') >= 10 and _job_process() is not None, proc)
    os.kill(_job_process(), signal.SIGUSR2)  # what Slurm sends ahead of the time limit when submitit asks
    check(finish(proc, tmp_path, timeout=300))

    log = (job / 'train.log').read_text()
    assert 'stopped by SIGUSR2 at epoch 1' in log and 'passing SIGUSR2 on to' in log
    assert 'resumed from' in log and 'Requeued job' in ''.join(
        open(p).read() for p in glob.glob(f'{sweep}/.submitit/*/*_log.*'))
    assert [s['loss'] for s in steps(job)] == [s['loss'] for s in steps(whole)] and len(steps(job)) == 64
    a, b = load_file(job / 'model' / 'model.safetensors'), load_file(whole / 'model' / 'model.safetensors')
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
