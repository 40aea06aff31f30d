"""When and where a training run saves ``checkpoints/last``, and how it stops after a stop signal's checkpoint.

The job (job.py) saves after every epoch's evaluation; ``Checkpointer.on_update``, the loop's per-update hook, also
saves every ``checkpoint_every_steps`` updates and at the update where a stop signal was seen (preemption.py), then
ends the run with ``Stopped``. ``last_good`` is the checkpoint a non-finite stop names.
"""
import logging
import os
from typing import Optional

from vit_gka.train.checkpoint import CHECKPOINTS, LAST
from vit_gka.train.loop import UpdateInfo
from vit_gka.train.preemption import Stopped
from vit_gka.train.results import RunRecords
from vit_gka.train.state import TrainParts, TrainState, run_dir_of, save_checkpoint

__all__ = ['Checkpointer']

log = logging.getLogger('vit_gka.train')


class Checkpointer:
    """When and where the run saves ``checkpoints/last``: after every epoch, every ``checkpoint_every_steps``
    updates, and at the update a stop signal came (then the run stops); and which checkpoint is the last good one."""

    def __init__(self, run_dir: str, state: TrainState, parts: TrainParts, records: RunRecords, resumed,
                 every_steps: Optional[int]):
        self.run_dir, self.state, self.parts, self.records = run_dir, state, parts, records
        self.last_dir = os.path.join(run_dir, CHECKPOINTS, LAST)
        self.every = int(every_steps) if every_steps else 0
        self.resumed = resumed  # the checkpoint this job resumed from, or None
        self.saved_at: Optional[int] = None  # the update of the last checkpoint this job wrote

    def save(self) -> None:
        if self.saved_at is not None:
            previous = self.saved_at
        else:  # resumed in place: what it resumed from
            chk = self.resumed
            previous = chk.state.num_updates if chk is not None and run_dir_of(chk.folder) == self.run_dir else None
        save_checkpoint(self.last_dir, self.state, self.parts,
                        previous=f'update {previous}' if previous is not None else None)
        self.saved_at = self.state.num_updates

    def last_good(self) -> Optional[str]:
        """The checkpoint a non-finite stop names: written by this job, or the one it resumed from."""
        if self.saved_at is not None:
            return f'{self.last_dir} (update {self.saved_at})'
        return self.resumed.folder if self.resumed is not None else None

    def on_update(self, info: UpdateInfo) -> None:
        """After every optimizer update: its record, a checkpoint when due or when a stop signal came (mid-epoch;
        at an epoch's end the epoch's own checkpoint comes after its evaluation)."""
        self.records.step(info)
        mid_epoch = info.step < len(self.parts.train_loader)
        if mid_epoch and (info.stop or self.every and info.update % self.every == 0):
            if self.saved_at != self.state.num_updates:
                self.save()
        if mid_epoch and info.stop:
            self.stopped(info.stop, f'at epoch {info.epoch + 1}, step {info.step} (update {info.update})')

    def stopped(self, signal_name: str, where: str) -> None:
        """End the run after the checkpoint of that update (preemption.py)."""
        self.records.close()
        message = (f'stopped by {signal_name} {where}: checkpoint {self.last_dir}; to continue, run the same command '
                   f'with {_continue_with(self.run_dir)}')
        log.info(message)
        raise Stopped(message, signal_name)


def _continue_with(run_dir: str) -> str:
    """The overrides that continue this job: its run folder's checkpoint, or a -m sweep's every job's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra
        return f'resume=auto hydra.run.dir={run_dir}'
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f'resume=auto hydra.sweep.dir={os.path.abspath(hydra_cfg.sweep.dir)}'
    return f'resume=auto hydra.run.dir={run_dir}'
