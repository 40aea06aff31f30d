"""A sweep a researcher can leave running: a failing job is a row of the table (failed.json, its one-line reason),
the other jobs run, the table is rewritten as each job ends, the report covers the finished jobs and lists the
failed ones, and the sweep exits non-zero. The same under Optuna's sweeper. Real tiny runs on Fashion-MNIST."""
import csv
import importlib.util
import json
import os
import shutil

import matplotlib.image as mpimg
import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from vit_gka.analysis import report, runtime
from vit_gka.analysis.summary import SweepSummary
from helpers import ROOT, needs_data, script

TINY_RUN = ['epochs=1', 'train_subset=128', 'data.eval_subset=64', 'batch_size=32', 'workers=0', 'progress=false',
            'model.args.depth=1', 'hydra.callbacks.report.num_images=8']
DIVERGES = '1e30'  # AdamW steps of 1e28: the LayerNorm's variance overflows, the loss is nan within a few updates


def _sweep(folder, *args):
    return script('train.py', ['-m', *args, *TINY_RUN, f'hydra.sweep.dir={folder}'], cwd=ROOT, timeout=600,
                  env={**os.environ, 'OMP_NUM_THREADS': '1'})


def _rows(folder):
    with open(os.path.join(folder, 'runs.csv')) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('sweep'))
    proc = _sweep(folder, 'model=gka', 'shape=fmnist', f'lr=8e-3,{DIVERGES},4e-3')
    return folder, proc


@needs_data
def test_a_failed_job_is_a_row_and_the_sweep_goes_on(sweep):
    folder, proc = sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f'error: 1 of 3 jobs failed; {folder}/runs.md lists them with their reasons (each job\'s log has the details)')
    runs = ['0_gka_fmnist', '1_gka_fmnist', '2_gka_fmnist']
    assert all(os.path.isdir(os.path.join(folder, r)) for r in runs)
    assert [os.path.isfile(os.path.join(folder, r, 'results.json')) for r in runs] == [True, False, True]
    with open(os.path.join(folder, '1_gka_fmnist', 'failed.json')) as f:
        failed = json.load(f)
    assert failed['exit_code'] == 3 and failed['error'].startswith('non-finite loss')
    assert 'lr=1e+30' in failed['overrides']
    with open(os.path.join(folder, '1_gka_fmnist', 'train.log')) as f:
        assert 'error: non-finite loss' in f.read()  # the job's one line, in its own log

    rows = _rows(folder)
    assert [(r['run'], r['status']) for r in rows] == [(runs[0], 'done'), (runs[1], 'failed'), (runs[2], 'done')]
    assert rows[1]['error'] == failed['error'] and rows[1]['top-1'] == '' and float(rows[0]['top-1']) > 0
    assert 0.1 < float(rows[0]['params (M)']) < 1  # millions, as the header says
    with open(os.path.join(folder, 'runs.md')) as f:
        table = f.read()
    assert f'failed: 1_gka_fmnist: {failed["error"]}' in table
    assert 'n=2' not in table  # two learning rates at seed 0 are two configurations, not two seeds of one
    with open(os.path.join(folder, 'report', 'report.md')) as f:
        text = f.read()
    assert '# Report: 2 runs' in text and '## Failed jobs' in text and failed['error'] in text


@needs_data
def test_the_table_is_rewritten_as_each_job_ends(sweep, tmp_path):
    # a sweep killed after its second job: the rows of the jobs that ended are there
    folder, _ = sweep
    killed = tmp_path / 'killed'
    for name in ('0_gka_fmnist', '1_gka_fmnist'):
        shutil.copytree(os.path.join(folder, name), killed / name)
    config = OmegaConf.create({'hydra': {'mode': RunMode.MULTIRUN, 'sweep': {'dir': str(killed)}}})
    SweepSummary().on_job_end(config, job_return=None)
    assert [(r['run'], r['status']) for r in _rows(killed)] == [('0_gka_fmnist', 'done'), ('1_gka_fmnist', 'failed')]
    assert (killed / 'runs.md').is_file()


@needs_data
def test_report_rebuilt_from_the_folder_with_learning_curves(sweep, tmp_path, capsys):
    folder, _ = sweep
    copy = tmp_path / 'sweep'
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns('report'))
    assert report.main([str(copy), '--images', '8'], prog='vit-gka-report') == 0
    out = capsys.readouterr().out
    assert '## Failed jobs' in out and '1_gka_fmnist' in out and 'learning_curves.png' in out
    img = mpimg.imread(copy / 'report' / 'learning_curves.png')
    assert img.shape[0] > 200 and img.std() > 0.01


@needs_data
def test_runtime_is_measured_only_where_the_jobs_ran(sweep):
    folder, _ = sweep
    rows = report.load_runs(report.find_runs([folder]))
    rows[1]['baseline_run'] = rows[0]['run']  # pretend the second run has a baseline in the sweep
    for r in rows:
        r['host'] = 'gpu-node-07'  # a Slurm job's node, not this (submitting) host
    measured, notes = runtime.runtime_rows(rows, [folder])
    assert measured == [] and len(notes) == 1
    assert 'gpu-node-07' in notes[0] and 'eval.py run=<run folder> bench=true' in notes[0]


@needs_data
@pytest.mark.skipif(importlib.util.find_spec('hydra_plugins.hydra_optuna_sweeper') is None,
                    reason="needs the Optuna sweeper (pip install -e '.[sweep]')")
def test_optuna_study_goes_on_after_a_diverging_trial(tmp_path):
    folder = str(tmp_path / 'study')
    # the example search space, its lr narrowed to a diverging and a sane value, which the random sampler with this
    # seed draws in that order (Optuna's grid sampler cannot end a study on a failed trial)
    proc = _sweep(folder, 'hparams_search=gka_fmnist', 'hydra/sweeper/sampler=random', 'hydra.sweeper.sampler.seed=0',
                  f'lr=choice(8e-3,{DIVERGES})',
                  'optim.weight_decay=choice(0.05)', 'hydra.sweeper.n_trials=2')
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [r['status'] for r in _rows(folder)] == ['failed', 'done']
    best = OmegaConf.load(os.path.join(folder, 'optimization_results.yaml'))
    assert best.best_params.lr == 8e-3 and best.best_value > 0
    assert os.path.isfile(os.path.join(folder, 'report', 'report.md'))


@needs_data
def test_eval_py_on_the_sweep_folder_writes_one_results_file(sweep, tmp_path):
    folder, _ = sweep
    copy = tmp_path / 'sweep'
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns('report'))
    proc = script('eval.py', [f'run={copy}', 'workers=0', 'progress=false', f'hydra.run.dir={tmp_path}/hydra'], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(copy / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == ['0_gka_fmnist', '2_gka_fmnist']  # the failed job has no model to evaluate
    recorded = {r['run']: float(r['top-1']) for r in _rows(copy) if r['status'] == 'done'}
    assert all(abs(float(r['top1']) - recorded[r['run']]) < 1e-6 for r in rows)  # eager fp32 runs: the same top-1
    assert (copy / '0_gka_fmnist' / 'eval.json').is_file() and (copy / 'results.md').is_file()


@needs_data
def test_run_folders_in_natural_order(sweep, tmp_path):
    folder, _ = sweep
    copy = tmp_path / 'sweep'
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns('report'))
    shutil.copytree(copy / '2_gka_fmnist', copy / '10_gka_fmnist')  # an eleventh job sorts after the third
    from vit_gka.analysis.summary import collect
    assert [r['run'] for r in collect([str(copy)])] == ['0_gka_fmnist', '1_gka_fmnist', '2_gka_fmnist', '10_gka_fmnist']
    assert [os.path.basename(r) for r in report.find_runs([str(copy)])] == ['0_gka_fmnist', '2_gka_fmnist',
                                                                           '10_gka_fmnist']
