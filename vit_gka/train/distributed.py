"""Accelerate for one job: the device (CPU processes where there is no GPU), mixed precision, the one
run folder that every process uses (and its lock, held by the main process), and the main process's results
on every process."""
import os
import shutil
from typing import Optional

import torch
from omegaconf import DictConfig

from vit_gka.errors import UserError
from vit_gka.train.lock import RunLock

__all__ = ['make_accelerator', 'shared_run_dir', 'lock_run_dir', 'from_main_process']


def _mixed_precision(value: str) -> str:
    """``mixed_precision`` of the config; ``auto``: what ``accelerate launch --mixed_precision`` or an ``accelerate
    config`` file asks for (bf16 / fp16 / fp8: Accelerate passes it on as ACCELERATE_MIXED_PRECISION), else bf16
    on a GPU that has it, else no. Accelerate's 'no' does not count: it is also what ``accelerate launch``
    passes when nothing was configured (fp32 on a GPU: ``mixed_precision=no``)."""
    if value in (None, 'auto'):
        launched = os.environ.get('ACCELERATE_MIXED_PRECISION', 'no').lower()
        if launched != 'no':
            return launched
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return 'bf16'
        return 'no'
    return str(value)


def _no_accelerator_device() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    xpu = getattr(torch, 'xpu', None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def make_accelerator(cfg: DictConfig):
    """Accelerate's state for this job. On a machine without GPU ``cpu=True`` is what makes Accelerate use
    several CPU processes (gloo) under torchrun / ``accelerate launch --multi_gpu``."""
    from accelerate import Accelerator
    from hydra.core.hydra_config import HydraConfig

    from vit_gka.train.validation import trackers
    log_with = trackers(cfg.log_with)
    # the trackers' folder (TensorBoard: <run>/tb): this process's Hydra output folder, which on the main
    # process, the only one that logs, is the run folder
    project_dir = HydraConfig.get().runtime.output_dir if log_with and HydraConfig.initialized() else None
    return Accelerator(
        cpu=bool(cfg.cpu) or _no_accelerator_device(),
        mixed_precision=_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=int(cfg.grad_accum),
        log_with=log_with or None,
        project_dir=project_dir,
    )


def shared_run_dir(accelerator) -> str:
    """The main process's Hydra run dir, on every process; removes a stray folder Hydra made for this rank."""
    from hydra.core.hydra_config import HydraConfig
    mine = os.path.abspath(HydraConfig.get().runtime.output_dir)
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import broadcast_object_list
    shared = broadcast_object_list([mine], from_process=0)[0]
    if shared != mine and not accelerator.is_main_process and os.path.isdir(mine):
        stray = set(os.listdir(mine))
        if stray <= {'.hydra', f'{HydraConfig.get().job.name}.log'}:
            shutil.rmtree(mine, ignore_errors=True)
    return shared


def lock_run_dir(accelerator, run_dir: str) -> Optional[RunLock]:
    """The main process takes ``run_dir``'s lock (lock.RunLock: one writer per run folder); when another run
    holds it, every process raises its ``UserError``. A collective: every process calls it."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
        except UserError as e:
            problem = str(e)
    problem = from_main_process(accelerator, problem)
    if problem:
        raise UserError(problem)
    return lock


def from_main_process(accelerator, obj):
    """The main process's ``obj`` on every process (picklable; a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]
