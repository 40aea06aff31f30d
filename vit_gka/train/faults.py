"""Fault injection into real training runs, for the tests only: never set these variables for a real run.

The reliability tests (tests/test_faults_*.py, test_reliability.py, test_preemption.py) start ``train.py`` as a
child process and need a fault at an exact point inside it: a NaN at update 5, a full disk while a checkpoint is
written, a process held mid-write so that it can be killed there. Each fault is an environment variable read at
that point; unset, every hook here does nothing. The training loop takes its hooks as one ``UpdateFaults``
(loop.py); the file writers (checkpoint.py, results.py) call the functions below.

Updates (``UpdateFaults``; update numbers are 1-based):

* ``VIT_GKA_TEST_NONFINITE=<update>[:loss|:grad|:weight]`` poisons that update: its loss is multiplied by NaN
  (``loss``, the default), one gradient is set to inf (``grad``), or one weight is set to inf after its optimizer
  step (``weight``);
* ``VIT_GKA_TEST_RAISE=<update>`` raises a ``RuntimeError`` (a bug, not a user error) after that update's step, to
  test that every exit path ends the loader workers.

Writes:

* ``VIT_GKA_TEST_PAUSE_IN_CHECKPOINT=<write|swap>[@n][:<file>]`` makes the n-th (default 2nd: the first that
  replaces one) ``write_checkpoint`` of the process sleep (10 minutes, or until ``<file>`` exists), either after
  ``model.safetensors`` is written into the temporary folder (``write``) or between the two renames (``swap``), so
  that a test can ``kill -9`` it there, or do something while it is surely running; ``model[:<file>]`` pauses the
  model/ folder's write (``save_model_folder``) the same way, before its folder is swapped in;
* ``VIT_GKA_TEST_FAIL_CHECKPOINT=<n>`` makes the n-th ``write_checkpoint`` of the process raise ``OSError(ENOSPC)``
  after its ``model.safetensors`` is written;
* ``VIT_GKA_TEST_FAIL_WRITE=<name>`` raises ``OSError(ENOSPC)`` in the write of the file or folder called
  ``<name>`` (best.safetensors, model, results.json, steps.jsonl, eval.json, ...), after its bytes went to a
  temporary.

The report (analysis/report.py):

* ``VIT_GKA_TEST_PAUSE_IN_REPORT=<file>`` holds a report, made but not yet moved into place, until ``<file>``
  exists (10 minutes at most), so that a test can signal it there.
"""
import errno
import os
import time
from typing import Optional, Tuple

import torch

__all__ = ['UpdateFaults', 'pause_in_checkpoint', 'fail_checkpoint', 'test_fail_write', 'POISON_ENV', 'RAISE_ENV',
           'PAUSE_ENV', 'FAIL_ENV', 'FAIL_WRITE_ENV', 'pause_in_report', 'REPORT_PAUSE_ENV']

POISON_ENV = 'VIT_GKA_TEST_NONFINITE'
RAISE_ENV = 'VIT_GKA_TEST_RAISE'
PAUSE_ENV = 'VIT_GKA_TEST_PAUSE_IN_CHECKPOINT'
FAIL_ENV = 'VIT_GKA_TEST_FAIL_CHECKPOINT'
FAIL_WRITE_ENV = 'VIT_GKA_TEST_FAIL_WRITE'
REPORT_PAUSE_ENV = 'VIT_GKA_TEST_PAUSE_IN_REPORT'


def _poison() -> Optional[Tuple[int, str]]:
    spec = os.environ.get(POISON_ENV)
    if not spec:
        return None
    update, _, kind = spec.partition(':')
    return int(update), kind or 'loss'


class UpdateFaults:
    """The training loop's faults (``VIT_GKA_TEST_NONFINITE``, ``VIT_GKA_TEST_RAISE``), read when an epoch starts."""

    def __init__(self):
        self.poison = _poison()  # (update, 'loss' | 'grad' | 'weight'), or None

    def loss(self, loss: torch.Tensor, update: int) -> torch.Tensor:
        """A micro-batch's loss to back-propagate: NaN where the update's loss is poisoned."""
        if self.poison is not None and self.poison == (update, 'loss'):
            return loss * float('nan')
        return loss

    def grads(self, model, update: int) -> None:
        """After backward, before clipping: one gradient set to inf where the update's gradient is poisoned."""
        if self.poison is not None and self.poison == (update, 'grad'):
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float('inf'))

    def weights(self, model, update: int) -> None:
        """After the optimizer step: the injected failure, or one weight set to inf where the weights are poisoned."""
        if os.environ.get(RAISE_ENV) == str(update):
            raise RuntimeError(f'{RAISE_ENV}: a failure injected at update {update}')
        if self.poison is not None and self.poison == (update, 'weight'):
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float('inf'))


def pause_in_checkpoint(stage: str, nth: int) -> None:
    """``VIT_GKA_TEST_PAUSE_IN_CHECKPOINT``: hold the process at ``stage`` (write | swap | model) of its ``nth``
    checkpoint write."""
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        spec, _, until = spec.partition(':')
        where, _, at = spec.partition('@')
        if where == stage and (stage == 'model' or nth == int(at or 2)):
            deadline = time.time() + 600
            while time.time() < deadline and not (until and os.path.exists(until)):
                time.sleep(0.05)


def pause_in_report() -> None:
    """``VIT_GKA_TEST_PAUSE_IN_REPORT=<file>``: hold the report before it is moved into place."""
    until = os.environ.get(REPORT_PAUSE_ENV)
    deadline = time.time() + 600
    while until and not os.path.exists(until) and time.time() < deadline:
        time.sleep(0.05)


def fail_checkpoint(path: str, nth: int) -> None:
    """``VIT_GKA_TEST_FAIL_CHECKPOINT``: ENOSPC for ``path`` in the process's ``nth`` checkpoint write."""
    at = os.environ.get(FAIL_ENV)
    if at and nth == int(at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_fail_write(path: str) -> None:
    """``VIT_GKA_TEST_FAIL_WRITE=<name>``: ENOSPC for the write of the file or folder called ``name``."""
    name = os.environ.get(FAIL_WRITE_ENV)
    if name and os.path.basename(os.path.normpath(path)) == name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
