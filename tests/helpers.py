"""What the test modules share: running train.py, checking its exit and one-line errors, digests of folders,
an ImageNet-layout folder of real JPEGs, the mask cases of the attention tests, and a pickle payload that stands
in for code a crafted file would run."""
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
HAS_FMNIST = os.path.isdir('/usr/share/datasets/fashion-mnist')
needs_data = pytest.mark.skipif(not HAS_FMNIST, reason='needs the Debian package dataset-fashion-mnist')

# Tiny and fast: 2 blocks (1 for resume), a few hundred images, one process-free data loader.
TINY = ['train_subset=192', 'data.eval_subset=96', 'batch_size=32', 'workers=0', 'progress=false',
        'model.args.depth=2']
# The finished run that the tests of a run folder's readers share (conftest.py's ``finished_run``): one block, one
# epoch of 64 images, raw and EMA weights, model/ written.
FINISHED = ['model=gka', 'shape=fmnist', 'epochs=1', *TINY, 'train_subset=64', 'data.eval_subset=32',
            'model.args.depth=1']


def _foolbox_images():
    """The 20 real ImageNet validation JPEGs that PyPI's foolbox ships (foolbox/data/imagenet_<nn>_<class>.jpg,
    RGB, mostly 512 x 512), found without importing foolbox; None when it is not installed."""
    spec = importlib.util.find_spec('foolbox')
    locations = spec.submodule_search_locations if spec is not None else None
    folder = os.path.join(locations[0], 'data') if locations else None
    if folder is None or not os.path.isdir(folder):
        return None
    files = sorted(f for f in os.listdir(folder) if f.startswith('imagenet_') and f.endswith('.jpg'))
    return [os.path.join(folder, f) for f in files] or None


IMAGENET_JPEGS = _foolbox_images()
needs_jpegs = pytest.mark.skipif(IMAGENET_JPEGS is None,
                                 reason="needs foolbox's ImageNet JPEGs (pip install -e '.[test]')")


def imagenet_folder(root):
    """``root`` laid out as ImageNet: ``train/<wnid>/<wnid>_<nn>.JPEG`` and ``val/<wnid>/<wnid>_<nn>.JPEG``, the 20
    real JPEGs of IMAGENET_JPEGS (19 classes, named by timm's WordNet ids) in both splits; returns ``root``."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    for path in IMAGENET_JPEGS:
        _, number, index = os.path.splitext(os.path.basename(path))[0].split('_')
        wnid = info.index_to_label_name(int(index))
        for split in ('train', 'val'):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            shutil.copyfile(path, os.path.join(root, split, wnid, f'{wnid}_{number}.JPEG'))
    return root


def _command(args, launcher=None, env=None):
    """train.py's command line under ``launcher`` (default: python), and its environment."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HYDRA_FULL_ERROR': '0', **(env or {})}
    return (launcher or [sys.executable]) + [TRAIN] + list(args), env


def torchrun(nproc=2):
    """torchrun's command line for ``nproc`` processes on this machine (gloo on the CPU), on a free port. It is a
    Python module: forked as any other (``python``), its processes are fresh interpreters."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
            str(free_port())]


def _background(cmd, cwd, env, out, err):
    """``cmd`` in the background, in a process group of its own, stdout and stderr to the files ``out`` and ``err``:
    forked where it is ``python ...`` and the environment allows (see ``python``), else a subprocess."""
    if cmd[0] == sys.executable and forked.forkable(env):
        return forked.ForkedRun(cmd[1:], env, cwd, stdout=out, stderr=err)
    with open(out, 'w') as stdout, open(err, 'w') as stderr:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def python(argv, cwd, env=None, timeout=300):
    """``python <argv>`` (a script and its arguments, or ``-m <module> ...``) in a process of its own, as
    ``subprocess.run(..., capture_output=True, text=True)``: forked from the preloaded fork server (forked.py) where
    the environment allows, else a plain subprocess. ``env`` replaces the environment (default: this one); one
    intra-op thread unless it says otherwise (the suite's workers share the cores)."""
    env = {'OMP_NUM_THREADS': '1', **(os.environ if env is None else env)}
    if forked.forkable(env):
        return forked.run(list(argv), env, cwd, timeout)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run(args, cwd, timeout=300, launcher=None, env=None):
    """``python train.py <args>``, or ``<launcher> train.py <args>`` (torchrun: ``torchrun()``, or any command): as
    ``python`` runs it where the launcher is Python, else a plain subprocess."""
    cmd, env = _command(args, launcher, env)
    if cmd[0] == sys.executable:
        return python(cmd[1:], cwd, env, timeout)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def script(name, args, cwd, env=None, timeout=300):
    """``python <name> <args>`` for the repository's ``train.py`` or ``eval.py`` (``python`` above)."""
    return python([os.path.join(ROOT, name), *args], cwd, env, timeout)


def popen(args, cwd, env=None):
    """train.py in the background (to be killed; forked where it can be, see ``python``), output discarded, in a
    process group of its own."""
    cmd, env = _command(args, env=env)
    return _background(cmd, cwd, env, os.devnull, os.devnull)


def start(args, cwd, env=None, launcher=None):
    """train.py (under ``launcher``, as ``run``) in the background, in a process group of its own (forked where it
    can be, see ``python``), stdout and stderr to ``cwd``/stdout.txt and stderr.txt."""
    cmd, env = _command(args, launcher, env)
    return _background(cmd, cwd, env, cwd / 'stdout.txt', cwd / 'stderr.txt')


def finish(proc, cwd, timeout=120):
    """Wait for ``start``'s run (killed with its process group after ``timeout`` s): what ``subprocess.run``
    returns."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, (cwd / 'stdout.txt').read_text(),
                                       (cwd / 'stderr.txt').read_text())


class Ranks:
    """The processes of one distributed run started as torchrun starts its workers: one command line, each process
    with its RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (what torch.distributed's
    env:// rendezvous and Accelerate read; gloo on the CPU), forked where they can be (``python``) instead of one
    fresh interpreter per rank, each in a process group of its own with its loader workers. As torchrun does, the
    others are ended when one fails (they would wait for it in the next collective). torchrun itself, with its
    signal forwarding, is test_preemption.py's launcher."""

    def __init__(self, argv, cwd, env, nproc=2):
        rendezvous = {'WORLD_SIZE': str(nproc), 'LOCAL_WORLD_SIZE': str(nproc), 'MASTER_ADDR': '127.0.0.1',
                      'MASTER_PORT': str(free_port())}
        self.args, self._folder, self.procs = [sys.executable, *argv], tempfile.mkdtemp(prefix='ranks-'), []
        for rank in range(nproc):
            rank_env = {**env, **rendezvous, 'RANK': str(rank), 'LOCAL_RANK': str(rank)}
            out, err = (os.path.join(self._folder, f'rank{rank}.{name}') for name in ('stdout', 'stderr'))
            self.procs.append(_background(self.args, cwd, rank_env, out, err))
        self.pids, self.returncode, self._output = [p.pid for p in self.procs], None, None

    def poll(self):
        """None while a rank runs; then the exit status of the first that failed (the others are ended as soon as
        one fails), else 0."""
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and self.returncode is None:
            self.returncode = failed[0]
            self.kill()
        if any(c is None for c in codes):
            return None
        if self.returncode is None:
            self.returncode = 0
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.poll()

    def kill(self):
        """SIGKILL to every rank and its loader workers."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def output(self):
        """(stdout, stderr) of every rank, rank 0 first, as torchrun prints them; the files are then removed."""
        if self._output is None:
            self._output = []
            for name in ('stdout', 'stderr'):
                parts = []
                for rank in range(len(self.procs)):
                    with open(os.path.join(self._folder, f'rank{rank}.{name}'), errors='replace') as f:
                        parts.append(f.read())
                self._output.append(''.join(parts))
            shutil.rmtree(self._folder)
        return self._output


def start_ranks(args, cwd, env=None, nproc=2, script=TRAIN):
    """``python <script> <args>`` (default: train.py) over ``nproc`` processes (``Ranks``), in the background."""
    _, env = _command(args, env=env)
    return Ranks([str(script), *args], cwd, env, nproc)


def run_ranks(args, cwd, env=None, nproc=2, script=TRAIN, timeout=300):
    """``start_ranks`` waited for (all ranks killed after ``timeout`` s): what ``subprocess.run(...,
    capture_output=True, text=True)`` returns, the ranks' output in rank order."""
    ranks = start_ranks(args, cwd, env, nproc, script)
    try:
        code = ranks.wait(timeout)
    except subprocess.TimeoutExpired:
        ranks.kill()
        ranks.wait()
        raise
    return subprocess.CompletedProcess(ranks.args, code, *ranks.output())


def copy_run(run_dir, tmp_path, name='run'):
    """A copy of the run folder ``run_dir`` under ``tmp_path``, for a test that changes or damages it."""
    dst = tmp_path / name
    shutil.copytree(run_dir, dst)
    return dst


def digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_line_error(proc, message, code=2):
    assert proc.returncode == code, f'exit {proc.returncode}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr


def check(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}'
    return proc


N = 50  # 1 class token + a 7 x 7 patch grid


def masks(n=N, batch=2, p_masked=0.3, window=5, dtype=torch.float32):
    """The mask cases every attention test runs: none, causal, windows, random boolean (with a fully masked
    row) and random additive. test_attention.py and test_kernels.py use them."""
    g = torch.Generator().manual_seed(3)
    rand_bool = torch.rand(batch, 1, n, n, generator=g) > p_masked
    rand_bool |= torch.eye(n, dtype=torch.bool)  # self always visible, as with timm's padding masks
    rand_bool[:, :, 4] = False  # a fully masked row
    additive = torch.where(torch.rand(batch, n, n, generator=g) > 0.3, 0.0, float('-inf')).to(dtype)
    additive = additive + torch.rand(batch, n, n, generator=g).to(dtype)  # finite soft biases too
    return {
        'none': dict(),
        'causal': dict(is_causal=True),
        'window': dict(window=window),
        'window_causal': dict(window=window, is_causal=True),
        'window_2d': dict(window_2d=1),
        'bool': dict(attn_mask=rand_bool),
        'additive_causal': dict(attn_mask=additive, is_causal=True),
    }


class Payload:
    """Unpickling this creates the file ``path``: the stand-in for code a crafted weights file would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def steps(run_dir):
    """The records of ``<run_dir>/steps.jsonl``, one per optimizer update."""
    with open(os.path.join(run_dir, 'steps.jsonl')) as f:
        return [json.loads(line) for line in f]


def lines(path):
    """The number of lines of a file (0 while it does not exist)."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_for(condition, proc, timeout=180):
    """Poll ``condition()`` until it holds, while the background run ``proc`` is still going."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, 'the run ended too early'
        assert time.time() < deadline, 'timed out waiting for the run'
        time.sleep(0.02)


def free_port():
    """A free TCP port on the loopback interface (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
