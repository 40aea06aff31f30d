"""A cluster path that survives preemption: train.py in subprocesses on tiny Fashion-MNIST subsets (CPU).

* ``resume=auto`` starts in an empty run folder and continues from the folder's own checkpoint, exactly;
* SIGTERM to every process of the run (as Slurm sends it, DataLoader worker included) checkpoints at the next
  update and ends in one line, exit status 75; ``resume=`` then continues exactly (steps.jsonl, weights); a
  signal during an epoch's end stops the run after that epoch's checkpoint;
* in a 2-process run a SIGUSR2 to one process only stops both after the same update;
* a full disk while a checkpoint is written: one line, exit 74, the last good checkpoint intact and resumable
  (injected ENOSPC; as root also a real full tmpfs under torch's and safetensors' writers);
* one writer per run folder: a second run on a folder in use stops at once naming the first's pid; a stale
  lock is taken over.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import check, finish, lines, needs_data, one_line_error, run, start, steps, torchrun, wait_for
from vit_gka.errors import UserError
from vit_gka.train import checkpoint as ckpt
from vit_gka.train.faults import FAIL_ENV, PAUSE_ENV
from vit_gka.train import lock as run_lock
from vit_gka.train import preemption
from vit_gka.train.state import load_checkpoint

# 6 updates per epoch, 2 epochs; every source of randomness in play, a loader worker process.
RUN = ['train_subset=96', 'data.eval_subset=32', 'batch_size=16', 'progress=false', 'model.args.depth=1',
       'save_model=false', 'epochs=2', 'drop_path=0.1', 'aug.mixup=0.8', 'aug.cutmix=1.0', 'aug.re_prob=0.25',
       'workers=1']


def same_run(straight, run_dir):
    assert steps(run_dir) == steps(straight)  # epoch, step, update, loss, lr: every update, exactly
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        a = load_file(straight / 'checkpoints' / 'last' / name)
        b = load_file(run_dir / 'checkpoints' / 'last' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.load(open(run_dir / 'results.json'))['top1'] == json.load(open(straight / 'results.json'))['top1']
    assert not (run_dir / run_lock.LOCK_FILE).exists()


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """The uninterrupted run that every stopped-and-continued run must reproduce."""
    folder = tmp_path_factory.mktemp('straight') / 'run'
    check(run([*RUN, f'hydra.run.dir={folder}'], cwd=folder.parent))
    return folder


@needs_data
def test_sigterm_checkpoints_at_the_next_update_then_resume_is_exact(straight, tmp_path):
    run_dir = tmp_path / 'run'
    proc = start([*RUN, f'hydra.run.dir={run_dir}'], cwd=tmp_path)
    wait_for(lambda: lines(run_dir / 'steps.jsonl') >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does: every process of the job, the loader worker too
    done = finish(proc, tmp_path)
    assert done.returncode == preemption.EXIT_STOPPED == 75, done.stderr[-3000:]
    assert 'Traceback' not in done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if ln.strip()]
    last = run_dir / 'checkpoints' / 'last'
    match = re.fullmatch(rf'stopped by SIGTERM (at epoch \d, step \d \(update (\d+)\)|after epoch \d \(update (\d+)\)): '
                         rf'checkpoint {last}; to continue, run the same command with resume=auto '
                         rf'hydra.run.dir={run_dir}', line)
    assert match, line
    update = int(match.group(2) or match.group(3))
    state = load_checkpoint(str(run_dir)).state  # the signal's own checkpoint (no checkpoint_every_steps)
    assert state.num_updates == update == lines(run_dir / 'steps.jsonl') and update < 12
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['last'] and not (run_dir / 'results.json').exists()
    check(run([*RUN, f'resume={run_dir}', f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    same_run(straight, run_dir)


@needs_data
def test_a_signal_during_an_epoch_end_stops_after_its_checkpoint(tmp_path):
    run_dir, go = tmp_path / 'run', tmp_path / 'go'
    proc = start([*RUN, f'hydra.run.dir={run_dir}'], cwd=tmp_path, env={PAUSE_ENV: f'write@1:{go}'})
    wait_for(lambda: any((p / ckpt.MODEL_FILE).is_file() for p in (run_dir / 'checkpoints').glob('last.tmp-*')),
             proc)  # in the checkpoint of the end of epoch 1
    os.kill(proc.pid, signal.SIGUSR1)
    go.touch()
    done = finish(proc, tmp_path)
    assert done.returncode == 75, done.stderr[-3000:]
    last = run_dir / 'checkpoints' / 'last'
    assert done.stderr == (f'stopped by SIGUSR1 after epoch 1 (update 6): checkpoint {last}; to continue, run the '
                           f'same command with resume=auto hydra.run.dir={run_dir}\n')
    state = load_checkpoint(str(run_dir)).state
    assert (state.epoch, state.step, state.num_updates) == (1, 0, 6) and lines(run_dir / 'steps.jsonl') == 6


@needs_data
def test_resume_auto_and_one_writer_per_run_folder(straight, tmp_path):
    run_dir, go = tmp_path / 'run', tmp_path / 'go'
    auto = [*RUN, 'resume=auto', f'hydra.run.dir={run_dir}']
    # An empty folder: resume=auto starts. Epoch 1 only; its checkpoint waits for the file `go`.
    first = start([*auto, 'stop_epoch=1'], cwd=tmp_path, env={PAUSE_ENV: f'write@1:{go}'})
    wait_for(lambda: any((p / ckpt.MODEL_FILE).is_file() for p in (run_dir / 'checkpoints').glob('last.tmp-*')),
             first)
    holder = json.loads((run_dir / run_lock.LOCK_FILE).read_text())
    assert holder['pid'] == first.pid and holder['host'] == socket.gethostname()
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / '.hydra').iterdir()}
    second = run([*RUN, f'hydra.run.dir={run_dir}'], cwd=tmp_path, timeout=60)
    one_line_error(second, f'run folder {run_dir} is in use by process {first.pid} on {socket.gethostname()}')
    assert {p.name: p.read_bytes() for p in (run_dir / '.hydra').iterdir()} == hydra_files
    go.touch()
    done = finish(first, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'resume=auto: no checkpoint' in done.stdout + done.stderr
    assert steps(run_dir) == steps(straight)[:6]  # the first run, uninterrupted by the second
    # The same command again, without stop_epoch: continues from the folder's own checkpoint.
    check(run(auto, cwd=tmp_path))
    same_run(straight, run_dir)


@needs_data
def test_a_full_disk_while_checkpointing_keeps_the_last_good_one(straight, tmp_path):
    run_dir = tmp_path / 'run'
    args = [*RUN, 'checkpoint_every_steps=2', 'resume=auto', f'hydra.run.dir={run_dir}']
    # Checkpoints after updates 2, 4, 6 (end of epoch 1), 8: the 4th write meets a full disk.
    proc = run(args, cwd=tmp_path, env={FAIL_ENV: '4'})
    last = run_dir / 'checkpoints' / 'last'
    one_line_error(proc, f'cannot write checkpoint {last}: no space left on device; the last good checkpoint is '
                         f'{last} (update 6), left as it was; make room (or fix the disk), then continue with '
                         f'resume={run_dir} hydra.run.dir={run_dir}', code=ckpt.EXIT_IO_ERROR)
    state = load_checkpoint(str(run_dir)).state
    assert (state.epoch, state.step, state.num_updates) == (1, 0, 6)
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['last']  # the failed write's folder is gone
    assert not (run_dir / run_lock.LOCK_FILE).exists()
    check(run(args, cwd=tmp_path))
    same_run(straight, run_dir)


def _rank_pid(parent, rank):
    """The pid of the child of ``parent`` that runs as ``RANK=rank``."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = f.read().split(b'\0')
        except OSError:
            continue
        if ppid == parent and f'RANK={rank}'.encode() in env:
            return int(pid)
    return None


@needs_data
def test_two_processes_stop_after_the_same_update(tmp_path):
    run_dir = tmp_path / 'run'
    args = ['train_subset=128', 'data.eval_subset=32', 'batch_size=8', 'workers=0', 'progress=false',
            'model.args.depth=1', 'epochs=1', 'save_model=false', f'hydra.run.dir={run_dir}']
    proc = start(args, cwd=tmp_path, launcher=torchrun())
    wait_for(lambda: lines(run_dir / 'steps.jsonl') >= 2, proc)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGUSR2)  # one process only: the other learns it at the update's all-reduce
    done = finish(proc, tmp_path)
    assert done.returncode != 0 and re.search(r'exitcode\s*:\s*75', done.stderr), done.stderr[-3000:]
    match = re.search(r'^stopped by SIGUSR2 at epoch 1, step (\d+) \(update \1\): checkpoint ', done.stderr, re.M)
    assert match, done.stderr[-3000:]
    chk = load_checkpoint(str(run_dir))
    assert chk.state.num_updates == int(match.group(1)) == lines(run_dir / 'steps.jsonl') < 8
    assert [p['totals']['images'] for p in chk.record['procs']] == [8 * chk.state.num_updates] * 2


def test_a_forked_process_has_its_own_exit_flag_for_its_loader_workers():
    # The flag that lets loader workers end on SIGTERM once their training process exits is shared memory. A process
    # forked from one that imported the module (a fork server's children) gets its own: the exit of one child must
    # not turn SIGTERM into an exit for the loader workers of its parent or of a sibling that is still training.
    flag = preemption._IgnoreStopSignals().releasing  # this process's, as its loader workers inherit it
    pid = os.fork()
    if pid == 0:  # a sibling run that ends
        preemption.release_workers()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert flag.value == 0
    preemption.release_workers()  # this process's own exit does set it
    assert flag.value == 1
    flag.value = 0


def test_a_stale_lock_is_taken_over_and_a_live_one_named(tmp_path):
    path = tmp_path / run_lock.LOCK_FILE
    path.write_text('')
    # A live process holds the file (as a leftover child of a killed run could), pid and host of a gone one in it.
    hold = ('import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); '
            'print("held", flush=True); time.sleep(60)')
    holder = subprocess.Popen([sys.executable, '-c', hold, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        gone = subprocess.Popen(['true'])
        gone.wait()
        path.write_text(json.dumps({'pid': gone.pid, 'host': socket.gethostname(), 'since': time.time()}))
        run_lock.check_free(str(tmp_path))
        lock = run_lock.RunLock(str(tmp_path)).acquire()  # taken over
        assert json.loads(path.read_text())['pid'] == os.getpid()
        # Now held by this live process: another taker is refused, naming it.
        with pytest.raises(UserError, match=rf'is in use by process {os.getpid()} on {re.escape(socket.gethostname())}'):
            run_lock.check_free(str(tmp_path))
        with pytest.raises(UserError, match=rf'is in use by process {os.getpid()} on '):
            run_lock.RunLock(str(tmp_path)).acquire()  # another open file: flock refuses it, even in one process
        lock.release()
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only)."""
    folder = tmp_path / 'disk'
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6M', 'tmpfs', str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip('needs root to mount a small tmpfs')
    yield folder
    subprocess.run(['umount', '-l', str(folder)], check=True)


@pytest.mark.parametrize('big', ['weights', 'state'])  # safetensors' writer / torch.save's
def test_a_real_full_disk_gives_one_line_and_keeps_the_last_good_one(small_disk, big):
    last = small_disk / 'run' / 'checkpoints' / 'last'
    small = {'w': torch.zeros(256 * 1024)}  # 1 MiB
    ckpt.write_checkpoint(str(last), small, {'num_updates': 1})
    huge = {'w': torch.zeros(1024 * 1024 * 2)}  # 8 MiB: does not fit
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        if big == 'weights':
            ckpt.write_checkpoint(str(last), huge, {'num_updates': 2}, previous='update 1')
        else:
            ckpt.write_checkpoint(str(last), small, {'num_updates': 2, 'big': huge['w']}, previous='update 1')
    assert str(e.value).startswith(f'cannot write checkpoint {last}: no space left on device; the last good '
                                   f'checkpoint is {last} (update 1), left as it was')
    assert e.value.exit_code == 74 and '\n' not in str(e.value)
    assert sorted(os.listdir(last.parent)) == ['last']
    assert torch.load(last / ckpt.STATE_FILE, weights_only=True) == {'num_updates': 1}
    assert torch.equal(load_file(last / ckpt.MODEL_FILE)['w'], small['w'])
