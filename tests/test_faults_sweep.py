"""Faults around a -m sweep on real data: a run folder with a corrupt or foreign file is skipped, with one warning
line, by the table and the report (the CLIs and the end-of-sweep callbacks), which are written with the other
runs; a second sweep onto a folder whose job is running is refused before Hydra writes anything; a stop signal
while the end-of-sweep report is made stops in one line and leaves no half-written report."""
import os
import shutil
import signal

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from vit_gka.analysis.report import TMP_PREFIX, ReportCallback
from vit_gka.train.faults import REPORT_PAUSE_ENV as PAUSE_ENV
from vit_gka.analysis.summary import SweepSummary
from helpers import ROOT, check, finish, needs_data, one_line_error, python, run, start, wait_for

pytestmark = needs_data

# one block, 64 images: one job of a sweep in a few seconds
SWEEP = ['-m', 'model=gka', 'shape=fmnist', 'epochs=1', 'train_subset=64', 'data.eval_subset=32', 'batch_size=32',
         'workers=0', 'progress=false', 'model.args.depth=1', 'hydra.callbacks.report.num_images=8']


def _tool(module, *args):
    return python(['-m', module, *args], ROOT, {**os.environ, 'OMP_NUM_THREADS': '1'})


def _skipped(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith('warning: skipping ')]


@pytest.fixture(scope='module')
def damaged_sweep(tmp_path_factory):
    """A finished sweep folder of five runs: two sound, one with a truncated results.json, one with a corrupt
    config.yaml, one whose model/ has truncated weights."""
    folder = tmp_path_factory.mktemp('sweep')
    check(run([*SWEEP, f'hydra.sweep.dir={folder}'], cwd=folder))
    good = folder / '0_gka_fmnist'
    for name in ('1_gka_fmnist', '2_gka_fmnist', '3_gka_fmnist', '4_gka_fmnist'):
        shutil.copytree(good, folder / name)
    results = (folder / '2_gka_fmnist' / 'results.json').read_text()
    (folder / '2_gka_fmnist' / 'results.json').write_text(results[:len(results) // 2])
    (folder / '3_gka_fmnist' / 'config.yaml').write_text('data: {name: [fmnist\n')
    weights = folder / '4_gka_fmnist' / 'model' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.rmtree(folder / 'report')
    os.remove(folder / 'runs.md')
    return folder


def test_the_summary_and_the_report_skip_a_damaged_run(damaged_sweep):
    folder = damaged_sweep
    summary = _tool('vit_gka.analysis.summary', str(folder))
    assert summary.returncode == 0 and 'Traceback' not in summary.stderr, summary.stderr[-3000:]
    # the table reads results.json only: the run with the truncated one is left out, the others are rows
    rows = [ln.split('|')[1].strip() for ln in summary.stdout.splitlines() if '_gka_fmnist' in ln]
    assert rows == ['0_gka_fmnist', '1_gka_fmnist', '3_gka_fmnist', '4_gka_fmnist']
    assert _skipped(summary.stderr) == [ln for ln in summary.stderr.splitlines() if ln.strip()]
    [line] = _skipped(summary.stderr)
    assert line.startswith(f'warning: skipping {folder}/2_gka_fmnist: {folder}/2_gka_fmnist/results.json is corrupt '
                           f'(JSONDecodeError: ')

    out = folder / 'cli_report'
    report = _tool('vit_gka.analysis.report', str(folder), '--out', str(out), '--images', '8')
    assert report.returncode == 0 and 'Traceback' not in report.stderr, report.stderr[-3000:]
    text = (out / 'report.md').read_text()
    assert '# Report: 2 runs' in text and '`0_gka_fmnist`, `1_gka_fmnist`' in text
    lines = _skipped(report.stderr)
    assert len(lines) == 3, report.stderr
    assert f'skipping {folder}/2_gka_fmnist: {folder}/2_gka_fmnist/results.json is corrupt' in lines[0]
    assert f'skipping {folder}/3_gka_fmnist: {folder}/3_gka_fmnist/config.yaml is corrupt' in lines[1]
    assert f'skipping {folder}/4_gka_fmnist: {folder}/4_gka_fmnist/model/model.safetensors is truncated' in lines[2]
    assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]


def test_the_end_of_sweep_callbacks_skip_a_damaged_run(damaged_sweep, capsys):
    folder = damaged_sweep
    config = OmegaConf.create({'hydra': {'mode': RunMode.MULTIRUN, 'sweep': {'dir': str(folder)}}})
    SweepSummary().on_multirun_end(config)
    ReportCallback(num_images=8).on_multirun_end(config)
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    # the table and the report of one sweep read the same folders: one warning per damaged folder
    assert [ln.split(': ')[1] for ln in _skipped(err)] == [f'skipping {folder}/{n}_gka_fmnist' for n in (2, 3, 4)]
    assert '2_gka_fmnist' not in (folder / 'runs.md').read_text() and '4_gka_fmnist' in (folder / 'runs.md').read_text()
    assert '# Report: 2 runs' in (folder / 'report' / 'report.md').read_text()


def test_a_second_sweep_onto_a_running_job_is_refused_before_anything_is_written(tmp_path):
    folder, go = tmp_path / 'sweep', tmp_path / 'go'
    job = folder / '0_gka_fmnist'
    first = start([*SWEEP, f'hydra.sweep.dir={folder}'], tmp_path, env={'VIT_GKA_TEST_PAUSE_IN_CHECKPOINT': f'model:{go}'})
    try:
        # the job holds its lock while its model/ write is held
        wait_for(lambda: job.is_dir() and any(n.startswith('model.tmp-') for n in os.listdir(job)), first)
        before = {p: (folder / p).read_bytes() for p in ('multirun.yaml', '0_gka_fmnist/.hydra/overrides.yaml')}
        second = run([*SWEEP, 'lr=1e-3', 'seed=1', f'hydra.sweep.dir={folder}'], cwd=tmp_path)
        one_line_error(second, f'sweep folder {folder} is busy: run folder {job} is in use by process {first.pid} ')
        assert 'give another hydra.sweep.dir=<folder>' in second.stderr
        assert {p: (folder / p).read_bytes() for p in before} == before
    finally:
        go.touch()
    assert finish(first, tmp_path).returncode == 0, (tmp_path / 'stderr.txt').read_text()[-3000:]
    assert (job / 'results.json').is_file()


def test_sigterm_while_the_sweep_report_is_written_stops_in_one_line(tmp_path):
    folder, go = tmp_path / 'sweep', tmp_path / 'go'
    report = folder / 'report'
    proc = start([*SWEEP, f'hydra.sweep.dir={folder}'], tmp_path, env={PAUSE_ENV: str(go)})
    try:
        # the report is made (its tables in the temporary folder) and not yet moved into place
        wait_for(lambda: report.is_dir() and any((report / n / 'table2.csv').is_file() for n in os.listdir(report)
                                                 if n.startswith(TMP_PREFIX)), proc)
        os.killpg(proc.pid, signal.SIGTERM)
        code = finish(proc, tmp_path).returncode
    finally:
        go.touch()
    stderr = (tmp_path / 'stderr.txt').read_text()
    assert code == 75 and 'Traceback' not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        f'stopped by SIGTERM while writing the report of {folder}: report.md not written, no file left '
        f'half-written; the runs are complete: to write the report, run vit-gka-report {folder}')
    assert [ln for ln in stderr.splitlines() if ln.startswith(('stopped', 'error'))] == [stderr.splitlines()[-1]]
    assert not report.exists()  # nothing half-made left: the folder was new
    assert (folder / '0_gka_fmnist' / 'results.json').is_file() and (folder / 'runs.md').is_file()
    # nothing lost: the report is made from the run folders, as the line says
    again = _tool('vit_gka.analysis.report', str(folder), '--images', '8')
    assert again.returncode == 0 and (report / 'report.md').is_file(), again.stderr[-3000:]
