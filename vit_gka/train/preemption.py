"""What a cluster does to a job, and what the run does about it: preemption signals and requeued jobs.

**Stop signals** (``StopSignals``: SIGTERM, SIGUSR2, SIGUSR1 and Ctrl-C's SIGINT, a second SIGINT stopping at
once). Slurm sends SIGTERM to every process of a job before it kills it (preemption,
``scancel``, the time limit; SIGKILL follows after its grace period, ``KillWait``), and submitit asks for SIGUSR2
(or SIGUSR1) ahead of the time limit. While the epochs run, these signals only latch a flag; the run checks it
at the next optimizer-update boundary, writes ``checkpoints/last`` there and ends with one line
``stopped by SIGTERM at epoch 2, step 5 (update 11): checkpoint <run>/checkpoints/last; continue with ...``,
exit status ``EXIT_STOPPED`` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, try again"; neither 0, which
would tell a job chain (``--dependency=afterok``) that the run finished, nor the 2 of a user mistake).
A signal that comes during the evaluation or the checkpoint at an epoch's end stops the run right after that
checkpoint. In a run of several processes the signal may reach only one: its flags ride on the all-reduce
that every update already makes (nonfinite.UpdateGuard sums the update's loss over processes), so every process
stops after the same update; at an epoch's end one tiny all-reduce (``agreed``) does the same.
DataLoader worker processes get the signal too (Slurm signals every process of the job) and would die of it,
failing the run before it can checkpoint: ``shield_workers`` makes them ignore these signals (the training
process shuts its workers down itself) until the training process exits, on any path (an error included):
then they end on the SIGTERM that multiprocessing's exit handler sends them, instead of hanging the exit.

**One writer per run folder**: ``vit_gka.train.lock``.

**Requeue** (Hydra's submitit launcher, ``hydra/launcher=slurm`` or ``submitit_local``). submitit handles
SIGUSR2 (its preemption / time-limit signal) by asking the job to checkpoint and requeueing it; the run's own
handler takes the signal first, writes ``checkpoints/last`` at the next update, and then passes the signal on
to submitit's handler (``Stopped.pass_on``), which requeues the same Hydra job: with ``resume=auto`` it continues
from that checkpoint, exactly. SIGTERM, which submitit only logs, ends the job with ``EXIT_STOPPED``.
"""
import atexit
import logging
import multiprocessing
import os
import signal
from typing import Any, Dict, List, Optional

import torch

from vit_gka.errors import UserError

__all__ = ['StopSignals', 'Stopped', 'EXIT_STOPPED', 'shield_workers']

log = logging.getLogger('vit_gka.train')

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL
# SIGINT (Ctrl-C) too: the first one stops the run as SIGTERM does, with a checkpoint; a second one at once
STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR2', 'SIGUSR1', 'SIGINT')
                     if hasattr(signal, name))


class Stopped(UserError):
    """The run stopped on signal ``signal_name`` after writing its checkpoint (one line, exit status
    ``EXIT_STOPPED``, or what the host that handles the signal makes of it: ``pass_on``)."""
    exit_code = EXIT_STOPPED
    input_error = False

    def __init__(self, message: str, signal_name: Optional[str] = None):
        super().__init__(message)
        self.signal_name = signal_name

    def pass_on(self) -> None:
        """Hand the signal to the handler the process had before the run (``StopSignals`` put it back), when that
        is a Python function: submitit's, which requeues the job (Hydra's submitit launcher resubmits the same
        job, and ``resume=auto`` continues it from the checkpoint just written) and exits. A default or ignored
        handler (a plain run, torchrun) is left alone: the run then exits ``EXIT_STOPPED``."""
        if self.signal_name is None:
            return
        signum = getattr(signal, self.signal_name)
        handler = signal.getsignal(signum)
        if callable(handler) and handler not in (signal.default_int_handler,):
            log.info('passing %s on to %s', self.signal_name, getattr(handler, '__qualname__', handler))
            handler(signum, None)


# --------------------------------------------------------------------------------------------- stop signals

class StopSignals:
    """While active (``with StopSignals() as stop:``), SIGTERM, SIGUSR2 and SIGUSR1 only latch a flag; the previous
    handlers come back at the end. ``flags()`` are this process's (one number per signal, summed over processes
    by whoever reduces them), ``name(flags)`` the first signal they show, ``agreed(accelerator)`` the verdict of
    all processes (a collective)."""

    def __init__(self):
        self.received: List[int] = []
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignals':
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # no I/O here: it interrupts whatever runs
        if signum == signal.SIGINT and signum in self.received:  # a second Ctrl-C: stop now, no checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if signum not in self.received:
            self.received.append(signum)

    def flags(self) -> List[float]:
        return [float(sig in self.received) for sig in STOP_SIGNALS]

    @staticmethod
    def name(flags) -> Optional[str]:
        """The signal that ``flags`` (this or every process's, summed) show, or None."""
        for sig, flag in zip(STOP_SIGNALS, flags):
            if float(flag) > 0:
                return signal.Signals(sig).name
        return None

    def agreed(self, accelerator) -> Optional[str]:
        """The signal any process received, on every process (a collective: every process calls it)."""
        flags = torch.tensor(self.flags(), dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            flags = accelerator.reduce(flags.to(accelerator.device), reduction='sum').cpu()
        return self.name(flags.tolist())


class _IgnoreStopSignals:
    """A DataLoader ``worker_init_fn`` that makes the worker ignore the stop signals (Ctrl-C's SIGINT among them:
    a terminal sends it to the whole process group), then calls ``init``. Ignored until the training process is on its way out
    (``release_workers``): then SIGTERM ends the worker, as multiprocessing's exit handler sends it to every
    loader worker still alive, and waits for it; a worker that ignored it would keep the process from ever
    exiting after an error."""

    def __init__(self, init=None):
        self.init = init
        self.releasing = _releasing()  # made in the training process, shared with the workers it forks

    def _signal(self, signum, frame) -> None:
        if signum == signal.SIGTERM and self.releasing.value:
            os._exit(0)

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._signal)
        if self.init is not None:
            self.init(worker_id)


# Set when this process exits: its loader workers then end on SIGTERM. Shared memory, inherited by the workers;
# one per process, made on first use rather than at import: a process forked from another that imported this
# module (a fork server's child) must not share its parent's, or the parent's other children's, exit.
_RELEASING: Dict[int, Any] = {}


def _releasing() -> Any:
    """This process's flag (a ``multiprocessing.RawValue``)."""
    pid = os.getpid()
    if pid not in _RELEASING:
        _RELEASING.clear()
        _RELEASING[pid] = multiprocessing.RawValue('b', 0)
    return _RELEASING[pid]


def release_workers() -> None:
    """Let this process's loader workers end on SIGTERM (at exit: atexit, before multiprocessing's own handler,
    which terminates and joins them)."""
    _releasing().value = 1


def shield_workers(loader) -> Any:
    """Make ``loader``'s worker processes ignore SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT while the run goes on, and
    end on SIGTERM once it exits, whatever the exit path (module docstring); returns ``loader``."""
    if not isinstance(loader.worker_init_fn, _IgnoreStopSignals):
        loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
    if not _atexit_registered:
        _register_release()
    return loader


_atexit_registered: List[bool] = []


def _register_release() -> None:
    # atexit runs its handlers last-registered first: this one before multiprocessing's (registered on import)
    atexit.register(release_workers)
    _atexit_registered.append(True)
