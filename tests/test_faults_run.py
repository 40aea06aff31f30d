"""Faults of a running training job on real data: weights that turn non-finite are never written and the message
names a checkpoint that resumes; a fresh run never writes over a run; Ctrl-C checkpoints and stops as SIGTERM does;
SIGTERM while model/ is written lets the run finish."""
import os
import signal
import time

import torch
from safetensors.torch import load_file

from helpers import TINY, check, digest, finish, lines, needs_data, one_line_error, run, start, steps, wait_for

pytestmark = needs_data

# 2 updates an epoch: 64 images, batch 32
SHORT = [*TINY, 'train_subset=64', 'data.eval_subset=32', 'model.args.depth=1']


def test_nonfinite_weights_are_never_written_and_the_named_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / 'run'
    args = ['epochs=2', *SHORT, f'hydra.run.dir={run_dir}']
    # update 4, the last of epoch 2: the step makes a weight inf although its loss and gradient were finite
    proc = run(args, cwd=tmp_path, env={'VIT_GKA_TEST_NONFINITE': '4:weight'})
    last = run_dir / 'checkpoints' / 'last'
    one_line_error(proc, 'non-finite weights after update 4 (', code=3)
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


def test_a_fresh_run_never_writes_over_a_run(tmp_path):
    run_dir = tmp_path / 'run'
    args = ['epochs=1', *SHORT, f'hydra.run.dir={run_dir}']
    check(run(args, cwd=tmp_path))
    before = digest(run_dir)
    one_line_error(run(args, cwd=tmp_path), f'run folder {run_dir} already holds a run (results.json); continue it '
                                            f'with resume=auto hydra.run.dir={run_dir}')
    assert digest(run_dir) == before
    check(run([*args, 'resume=auto'], cwd=tmp_path))  # a finished run: evaluated again, nothing trained


def test_ctrl_c_checkpoints_and_stops_like_sigterm(tmp_path):
    run_dir = tmp_path / 'run'
    # 6 updates an epoch, a loader worker: Ctrl-C reaches it too
    args = ['epochs=1', *TINY, 'train_subset=96', 'batch_size=16', 'data.eval_subset=32', 'model.args.depth=1',
            'workers=1', f'hydra.run.dir={run_dir}']
    proc = start(args, tmp_path)
    wait_for(lambda: lines(run_dir / 'steps.jsonl') >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    done = finish(proc, tmp_path)
    stderr = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 75 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert len(stderr) == 1 and stderr[0].startswith('stopped by SIGINT at epoch 1, step '), stderr
    assert (run_dir / 'checkpoints' / 'last' / 'state.pt').exists()
    check(run([*args, 'resume=auto'], cwd=tmp_path))
    assert len(steps(run_dir)) == 6


def test_sigterm_while_model_folder_is_written_lets_the_runfinish(tmp_path):
    run_dir, go = tmp_path / 'run', tmp_path / 'go'
    args = ['epochs=1', *SHORT, f'hydra.run.dir={run_dir}']
    proc = start(args, tmp_path, env={'VIT_GKA_TEST_PAUSE_IN_CHECKPOINT': f'model:{go}'})
    wait_for(lambda: any(n.startswith('model.tmp-') for n in os.listdir(run_dir)) if run_dir.exists() else False,
             proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    go.touch()
    done = finish(proc, tmp_path)
    assert done.returncode == 0 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert (run_dir / 'results.json').exists() and (run_dir / 'model' / 'model.safetensors').exists()
    assert not any(n.startswith('model.tmp-') for n in os.listdir(run_dir))
