"""``vit-gka-train`` / ``python train.py``: the Hydra entry point of training (configs in ``conf/``).

    python train.py                                    # small GKA ViT on Fashion-MNIST (recipe=quick)
    python train.py -m model=gka,deit shape=fmnist  # the quickstart benchmark, then a comparison table
    python train.py experiment=paper_gka_s data.root=/data/imagenet   # = model=gka shape=small data=imagenet recipe=deit
    torchrun --nproc_per_node 2 train.py train_subset=512 epochs=1
    python train.py resume=runs/gka_fmnist/<date> hydra.run.dir=runs/gka_fmnist/<date>   # continue in place
    python train.py resume=auto hydra.run.dir=runs/in1k    # a (re)queued cluster job: continue if there is a
                                                           # checkpoint in runs/in1k, else start

A run stopped by SIGTERM / SIGUSR2 / SIGUSR1 checkpoints at the next optimizer update and ends with one line
``stopped by ...`` (no ``error:``), exit status 75 (vit_gka.train.preemption). A run folder that another live
run holds (``<dir>/run.lock``) is refused before Hydra writes into it. In a ``-m`` sweep a failing job is a
row of the sweep's table and the sweep goes on; the sweep then exits with status 1 (vit_gka.train.sweep). The
run itself is ``vit_gka.train.job.run_training``.

This module imports no torch, timm or training code at the top: ``--help`` and shell completion answer without
them, and the job imports them when it starts.
"""
import functools
import os
import sys
from typing import Callable, List, Optional

import hydra
from omegaconf import DictConfig

from vit_gka.errors import UserError, fail
from vit_gka.cli import CONF_DIR, CONF_PATH, check_overrides, exit_on_user_error
from vit_gka.train.sweep import exit_status, keep_sweeping



def _stop_in_one_line(fn: Callable) -> Callable:
    """A run stopped on a signal (``Stopped``, after its checkpoint): its one line, without ``error:``, and its
    exit status (every process; the main one prints)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vit_gka.train.preemption import Stopped
        try:
            return fn(*args, **kwargs)
        except Stopped as e:
            if os.environ.get('RANK', '0') == '0':
                sys.stderr.write(' '.join(str(e).split()) + '\n')
                sys.stderr.flush()
            e.pass_on()  # a host that handles the signal (submitit: requeue) takes over from here
            raise SystemExit(e.exit_code)

    return wrapper


@hydra.main(version_base='1.3', config_path=CONF_PATH, config_name='config')
@exit_on_user_error
@_stop_in_one_line
@keep_sweeping
def _hydra_main(cfg: DictConfig) -> float:
    from vit_gka.train.job import run_training
    results = run_training(cfg)
    return results['top1'] if results else float('nan')


def check_run_folder_free(argv: Optional[List[str]] = None) -> None:
    """One line and exit status 2 when the ``hydra.run.dir=`` of a single run is held by another live run, before
    Hydra writes ``.hydra/`` into it (the job checks again when it takes the folder: lock.RunLock)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith('-') for a in argv):  # -m sweeps (a folder per job), --cfg, --help, ...: not here
        return
    folders = [a.split('=', 1)[1].strip('\'"') for a in argv if a.startswith('hydra.run.dir=')]
    if folders and folders[-1]:
        from vit_gka.train.lock import check_free
        try:
            check_free(folders[-1])
        except UserError as e:
            fail(str(e))


def main() -> None:
    from vit_gka.train.validation import validate
    check_overrides(CONF_DIR, 'config', validate=validate)
    check_run_folder_free()
    _hydra_main()
    status = exit_status()
    if status:
        raise SystemExit(status)


if __name__ == '__main__':
    main()
