"""``python <script>`` and ``python -m <module>`` as processes of their own without paying their imports each time:
Python's multiprocessing forkserver, preloaded with torch, timm and the training package, forks one process per run.

Most of the suite's time is train.py in child processes, and most of a tiny run's time is its imports (torch,
timm, torchvision, Hydra, Accelerate: about 8 of 11 s on a 2-core machine). A forked run is still a process of its
own: its own argv, environment, working folder, stdout and stderr, exit status, signals and pid (tests kill it), and
the same code from the script's (or module's) ``__main__`` on. What it shares with the other runs is only what the
imports left behind, which is what a fresh interpreter would have built again; shared memory made at import would
be shared by every run, so the package makes such things per process (preemption's exit flag for loader workers).
A launcher that is a Python module (torchrun) is forked too; the processes it starts are fresh interpreters. Runs
that need an interpreter of their own (another launcher, or an environment variable that a library reads when it
is imported, such as ``PYTHONPATH`` or ``HF_HUB_OFFLINE``: ``forkable``) are ordinary subprocesses (helpers.py).
"""
import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

PRELOAD = ['torch', 'timm', 'hydra', 'vit_gka.train.main', 'vit_gka.train.job']
# Variables read when a library is imported (the interpreter's, Hugging Face Hub's, Triton's, the OpenMP runtime's):
# a run that sets one to another value than the fork server had needs an interpreter of its own.
IMPORT_TIME = ('PYTHON', 'HF_', 'HUGGINGFACE_', 'TRITON_', 'OMP_', 'MKL_', 'CUDA_', 'TORCH')
_CTX = multiprocessing.get_context('forkserver')
_started = []
_running = set()  # the runs not yet waited for, killed when the test process ends


def _server_env():
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def forkable(env) -> bool:
    """Whether a run with environment ``env`` can be forked: no import-time variable differs from the server's."""
    server = _server_env()
    keys = {k for k in {*env, *server} if k.startswith(IMPORT_TIME)}
    return all(env.get(k) == server.get(k) for k in keys)


def _ensure_forkserver():
    """Start the fork server once per test process, with one intra-op thread (as OMP_NUM_THREADS=1, which the
    OpenMP runtime reads when torch loads)."""
    if not _started:
        _CTX.set_forkserver_preload(PRELOAD)
        before = os.environ.get('OMP_NUM_THREADS')
        os.environ['OMP_NUM_THREADS'] = '1'
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ['OMP_NUM_THREADS']
            else:
                os.environ['OMP_NUM_THREADS'] = before
        _started.append(True)


def _main(argv, env, cwd, out, err):
    """The forked process: ``python <argv>`` from here on (a script, or ``-m <module>``), as the interpreter would
    run it."""
    os.setpgid(0, 0)  # a process group of its own, with its loader workers: killed as one, as a job is
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the fork server ignores Ctrl-C; python does not
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as in a fresh interpreter
    code = 0
    try:
        if argv[0] == '-m':  # as ``python -m``: the working folder first on the path, argv[0] the module's file
            module = argv[1]
            sys.path[0] = os.getcwd()
            sys.argv = [module, *argv[2:]]
            sys.modules.pop(module, None)  # preloaded as an import: run afresh as __main__, as python -m does
            runpy.run_module(module, run_name='__main__', alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + '\n')
            code = 1
        else:
            code = e.code or 0
    except BaseException:  # what the interpreter prints for an exception nobody caught
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # the interpreter's exit: logging flushed, loader workers ended, ...
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedRun:
    """The parts of ``subprocess.Popen`` the tests use, for a forked run."""

    def __init__(self, argv, env, cwd, stdout=None, stderr=None):
        """``stdout``, ``stderr``: files for its output (default: a temporary folder's, read by ``output``)."""
        _ensure_forkserver()
        self.args = [sys.executable, *argv]
        self._folder = None if stdout and stderr else tempfile.mkdtemp(prefix='forked-')
        self._out = str(stdout) if stdout else os.path.join(self._folder, 'stdout')
        self._err = str(stderr) if stderr else os.path.join(self._folder, 'stderr')
        self._process = _CTX.Process(target=_main, args=(list(argv), dict(env), str(cwd), self._out, self._err))
        self._process.start()
        self.pid = self._process.pid
        self.returncode = None
        _running.add(self)

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
            _running.discard(self)
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def kill(self):
        """SIGKILL to the run and every process it started (its loader workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def output(self):
        """(stdout, stderr) as text, once the run has ended; temporary files are removed."""
        texts = []
        for path in (self._out, self._err):
            with open(path, errors='replace') as f:
                texts.append(f.read())
        if self._folder:
            shutil.rmtree(self._folder)
        return texts


@atexit.register
def _kill_leftovers():
    for proc in list(_running):
        proc.kill()


def run(argv, env, cwd, timeout):
    """``subprocess.run([python, *argv], capture_output=True, text=True)`` of a forked run."""
    proc = ForkedRun(argv, env, cwd)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    out, err = proc.output()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
