"""A ``-m`` sweep that runs to its end: a failing job is recorded and the next one starts.

Hydra 1.3 catches only ``Exception`` around a job, and its basic sweeper re-raises a failed job's exception after
the batch, so the end-of-sweep callbacks (the table, the report) would never run. Inside a sweep, ``keep_sweeping``
therefore turns a job's failure into

* its one line (``error: ...``) in the job's log (and, for a bug, the traceback under it),
* ``failed.json`` in its run folder (the reason, the exit status the single run would have had, the overrides),
* ``None`` as the job's value: no number, which Optuna's sweeper records as a failed trial (a ``nan`` would stop
  its study) before it goes on;

and ``exit_status`` gives the sweep's exit status (1 when any job failed) after Hydra returns. A single run (no
``-m``) is left as it is: one line and its own exit status (cli.exit_on_user_error). This module imports no torch:
the entry points import it before they know whether a job will run.
"""
import functools
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

from vit_gka.errors import UserError

__all__ = ['FAILED_FILE', 'EXIT_JOBS_FAILED', 'keep_sweeping', 'read_failed', 'note_sweep_end', 'exit_status']

FAILED_FILE = 'failed.json'
EXIT_JOBS_FAILED = 1  # the sweep ran to its end, and at least one of its jobs failed

log = logging.getLogger('vit_gka.train')

_FINISHED_SWEEPS: List[Dict] = []  # {'dir', 'jobs', 'failed'} of the sweeps this process ran (note_sweep_end)


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg, reason: str, exit_code: int) -> None:
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    record = {'status': 'failed', 'error': reason, 'exit_code': exit_code, 'job_num': hc.job.num,
              'model_config': cfg.get('model_choice'), 'seed': cfg.get('seed'),
              'overrides': list(hc.overrides.task)}
    folder = hc.runtime.output_dir
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, FAILED_FILE + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(folder, FAILED_FILE))


def keep_sweeping(fn: Callable) -> Callable:
    """Decorate a Hydra task (inside ``exit_on_user_error``): in a ``-m`` sweep a job that raises is recorded as
    failed (module docstring) and returns ``None``, so that the sweep goes on. A stop signal (``Stopped``) still
    ends the sweep: the user or the cluster asked for it. Outside a sweep the task is called as it is."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        if not _in_sweep():
            return fn(cfg, *args, **kwargs)
        from hydra.core.hydra_config import HydraConfig

        from vit_gka.train.preemption import Stopped
        stale = os.path.join(HydraConfig.get().runtime.output_dir, FAILED_FILE)
        if os.path.exists(stale):  # this job ran before and failed: it is being run again
            os.remove(stale)
        try:
            return fn(cfg, *args, **kwargs)
        except Stopped:
            raise
        except UserError as e:
            reason, code = _one_line(e), getattr(e, 'exit_code', 2)
            log.error('error: %s', reason)
        except Exception as e:  # a bug: the traceback goes into the job's log, the sweep goes on
            reason, code = _one_line(f'{type(e).__name__}: {e}'), 1
            log.exception('error: %s', reason)
        if os.environ.get('RANK', '0') == '0':
            _record_failure(cfg, reason, code)
        return None

    return wrapper


def read_failed(folder: str) -> Optional[Dict]:
    """The ``failed.json`` record of a run folder, or None (no such file, or the run finished since)."""
    path = os.path.join(folder, FAILED_FILE)
    if not os.path.isfile(path) or os.path.isfile(os.path.join(folder, 'results.json')):
        return None
    with open(path) as f:
        return json.load(f)


def note_sweep_end(sweep_dir: str, jobs: int, failed: int) -> None:
    """What the end-of-sweep callback found (SweepSummary), for ``exit_status``."""
    _FINISHED_SWEEPS.append({'dir': sweep_dir, 'jobs': jobs, 'failed': failed})


def exit_status() -> int:
    """0, or ``EXIT_JOBS_FAILED`` after one line saying how many jobs of the sweep failed and where they are
    listed, when any job of a sweep this process ran failed."""
    failed = [s for s in _FINISHED_SWEEPS if s['failed']]
    if not failed:
        return 0
    s = failed[-1]
    sys.stderr.write(f"error: {s['failed']} of {s['jobs']} jobs failed; {os.path.join(s['dir'], 'runs.md')} lists "
                     f"them with their reasons (each job's log has the details)\n")
    sys.stderr.flush()
    return EXIT_JOBS_FAILED
