"""A full disk (injected ENOSPC: ``VIT_GKA_TEST_FAIL_WRITE=<name>``) outside the checkpoint writer: every write of a
run and of eval.py, the export and publish ends in one line, exit 74, leaves no half-written file, and the rerun
after making room finishes."""
import os

import pytest

from helpers import ROOT, TINY, check, needs_data, one_line_error, python, run

pytestmark = needs_data

ARGS = ['epochs=1', *TINY, 'train_subset=64', 'data.eval_subset=32', 'model.args.depth=1']
FULL = 'no space left on device'


def _leftovers(folder):
    return [n for n in os.listdir(folder) if '.tmp' in n or n.startswith('.')]


@pytest.mark.parametrize('name, then', [
    ('best.safetensors', 'is intact: make room (or fix the disk), then continue with resume=auto'),
    ('model', 'is intact: make room (or fix the disk), then continue with resume=auto'),
    ('results.json', 'is intact: make room (or fix the disk), then continue with resume=auto'),
    ('steps.jsonl', 'no checkpoint was written yet: make room (or fix the disk), then run the same command again'),
])
def test_a_full_disk_in_a_run_is_one_line_and_the_rerun_finishes(tmp_path, name, then):
    run_dir = tmp_path / 'run'
    args = [*ARGS, f'hydra.run.dir={run_dir}']
    proc = run(args, cwd=tmp_path, env={'VIT_GKA_TEST_FAIL_WRITE': name})
    one_line_error(proc, f'cannot write {run_dir / name}: {FULL}; ', code=74)
    assert then in proc.stderr
    assert not (run_dir / 'results.json').exists() and _leftovers(run_dir) == ['.hydra']
    if name != 'steps.jsonl':  # the epoch is kept: the checkpoint comes before best.safetensors and model/
        assert (run_dir / 'checkpoints' / 'last' / 'state.pt').exists()
    check(run([*args, 'resume=auto'], cwd=tmp_path))
    for done in ('results.json', 'best.safetensors', 'model/model.safetensors'):
        assert (run_dir / done).exists(), done


def _tool(args, cwd, fail):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HYDRA_FULL_ERROR': '0', 'VIT_GKA_TEST_FAIL_WRITE': fail}
    return python(args, cwd, env)


def test_a_full_disk_under_eval_export_and_publish(finished_run, tmp_path):
    finished = finished_run
    out = tmp_path / 'out'
    os.makedirs(out)
    proc = _tool(['eval.py', f'run={finished}', 'workers=0', f'out={out}', f'hydra.run.dir={tmp_path}/h'], ROOT,
                 'eval.json')
    one_line_error(proc, f'cannot write {out / "eval.json"}: {FULL}; make room', code=74)
    proc = _tool(['-m', 'vit_gka.export', str(finished), str(out / 'm.onnx')], ROOT, 'm.onnx')
    # (torch's exporter warns of its tracing on the way: every export does)
    assert proc.returncode == 74 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (f'error: cannot write {out / "m.onnx"}: {FULL}; make room (or fix the '
                                            f'disk), then run the same command again')
    proc = _tool(['-m', 'vit_gka.publish', str(finished), str(out / 'hub')], ROOT, 'hub')
    one_line_error(proc, f'cannot write {out / "hub"}: {FULL}; make room', code=74)
    assert os.listdir(out) == []  # no 0-byte eval.json, no partial .onnx, no half a hub folder
    check(_tool(['-m', 'vit_gka.publish', str(finished), str(out / 'hub')], ROOT, ''))  # room made: it finishes
    assert sorted(os.listdir(out / 'hub')) == ['README.md', 'config.json', 'config.yaml', 'model.safetensors']
