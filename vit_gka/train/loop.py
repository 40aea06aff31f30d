"""The training and evaluation loops, DeiT-engine style (``train_one_epoch`` / ``evaluate``), on Accelerate.

``train_one_epoch`` does one pass over the training loader: mixup / cutmix, forward (under Accelerate's
mixed precision), backward, gradient accumulation, gradient clipping, the non-finite check, the optimizer
step, the EMA update and the per-update learning-rate schedule, then the caller's per-update hook (steps.jsonl,
mid-epoch checkpoints). ``evaluate`` returns top-1 / top-5 / loss / images per second over a whole loader,
gathered across processes.

The non-finite guard of every update is ``nonfinite.UpdateGuard``; the tests' faults in updates are
``faults.UpdateFaults``.

Gradient accumulation: ``accelerator.gradient_accumulation_steps`` micro-batches per optimizer step
(``accelerator.backward`` divides the loss by it; gradients are not all-reduced until the last micro-batch); a
shorter last group at the end of the epoch still steps, with the mean over its own micro-batches. The schedule is
stepped per optimizer update (``lr_scheduler.step_update``), the EMA after every update.

Mid-epoch resume: ``train_one_epoch``'s ``loader`` yields the epoch's batches from ``state.step`` on
(``skip_first_batches``) and ``state.totals`` are this process's sums over the first ``state.step``.
``on_update(info)`` is called after every update (``state`` already advanced) with an ``UpdateInfo``.
"""
import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from vit_gka.train.faults import UpdateFaults
from vit_gka.train.nonfinite import UpdateGuard, Verdict

__all__ = ['train_one_epoch', 'evaluate', 'sigma_stats', 'EpochStats', 'UpdateInfo']

log = logging.getLogger('vit_gka.train')


def sigma_stats(model: nn.Module) -> Dict[int, Dict[str, float]]:
    """Per block: mean / min / max of the learned GKA bandwidths sigma = exp(log_sigma); {} without GKA."""
    out = {}
    blocks = getattr(model, 'blocks', None)
    if blocks is None:
        return out
    for i, block in enumerate(blocks):
        log_sigma = getattr(getattr(block, 'attn', None), 'log_sigma', None)
        if log_sigma is None:
            continue
        sigma = log_sigma.detach().float().exp()
        out[i] = {'mean': sigma.mean().item(), 'min': sigma.min().item(), 'max': sigma.max().item()}
    return out


@dataclasses.dataclass
class UpdateInfo:
    """What ``train_one_epoch`` tells its ``on_update`` after every optimizer update (steps.jsonl's line)."""
    epoch: int              # the epoch, counted from 0
    step: int               # micro-batches of this epoch done, this update's included
    update: int             # optimizer updates of the run done, this one included
    loss: Optional[float]   # mean over the update's images on all processes; None when not finite
    lr: float               # the optimizer's learning rate once the schedule has stepped for this update
    skipped: bool           # dropped as non-finite (nonfinite=skip): no optimizer or EMA step
    stop: Optional[str]     # the stop signal any process has received by this update, the same on every process
                            # (preemption.py); None: none


@dataclasses.dataclass
class EpochStats:
    """What ``train_one_epoch`` returns: the epoch's numbers, a resumed epoch's part before the resume included."""
    loss: float                 # mean training loss over the epoch's images on all processes
    lr: float                   # the learning rate after the epoch's last update
    images_per_s: float         # training images per second, all processes together
    images: int                 # images of finite updates, all processes together
    time_s: float               # seconds the epoch took
    data_wait_s: float          # seconds spent waiting for the loader (the processes' mean)
    data_wait_fraction: float   # data_wait_s's share of time_s
    skipped: int                # updates dropped for a non-finite loss or gradient


def train_one_epoch(parts, state, epoch: int, loader, on_update: Optional[Callable[[UpdateInfo], None]] = None,
                    tracker=None, desc: str = '') -> EpochStats:
    """One epoch, or its rest, of the run ``parts`` (``state.TrainParts``: model, optimizer, schedule, loss,
    mixup, EMA, clipping, non-finite policy, logging), advancing ``state`` (``state.TrainState``) update by
    update: ``num_updates``, ``step`` (micro-batches of this epoch done) and ``totals`` (this process's sums so
    far: ``loss_sum``, ``images``, ``skipped``, ``time_s``, ``data_wait_s``). ``on_update(info)``: the module
    docstring."""
    accelerator, model = parts.accelerator, parts.model
    model.train()
    accum = max(1, int(getattr(accelerator, 'gradient_accumulation_steps', 1)))
    start_step, n_batches = state.step, state.step + len(loader)
    sums = _Sums.resumed(state.totals)
    guard = UpdateGuard(accelerator, parts.nonfinite, getattr(parts, 'stop', None))
    faults = UpdateFaults()
    desc = desc or f'epoch {epoch + 1}'
    bar = _progress_bar(parts, desc, start_step, n_batches)
    lr = parts.optimizer.param_groups[0]['lr']
    for step, (images, targets) in enumerate(_timed(loader, sums), start=start_step):
        images, targets = _on_device(parts, images, targets)
        sync = (step + 1) % accum == 0 or step + 1 == n_batches
        update = state.num_updates + 1
        # micro-batches of this update: accum, fewer in an epoch's last group
        group = min(accum, n_batches - step // accum * accum)
        with contextlib.nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model):
            loss = _forward_backward(parts, faults, images, targets, update, accum, group)
        guard.add(loss, images.shape[0])
        bar.update(1)
        if not sync:
            continue
        verdict = _update(parts, guard, faults, update, f'epoch {epoch + 1}, step {step + 1}')
        sums.count(verdict)
        state.num_updates, state.step = update, step + 1
        lr = parts.optimizer.param_groups[0]['lr']
        state.totals = sums.saved()
        if on_update is not None:
            on_update(UpdateInfo(epoch, step + 1, update, verdict.loss if math.isfinite(verdict.loss) else None, lr,
                                 skipped=not verdict.ok, stop=verdict.stop))
        if update % parts.log_interval == 0 or step + 1 == n_batches:
            _log_progress(bar, tracker, desc, step + 1, n_batches, update, verdict, lr,
                          *sums.rates(accelerator.num_processes))
    bar.close()
    return sums.epoch_stats(accelerator, lr)


@dataclasses.dataclass
class _Sums:
    """This process's running sums over the epoch, kept in ``state.totals`` so that a mid-epoch resume goes on
    from them."""
    loss_sum: float = 0.0     # the loss summed over the images of finite updates
    images: int = 0           # the images of finite updates
    skipped: int = 0          # updates dropped as non-finite
    data_wait_s: float = 0.0  # seconds spent waiting for the loader (``_timed``)
    started: float = 0.0      # perf_counter() of the epoch's start, moved back by the time before a resume

    @classmethod
    def resumed(cls, totals: Optional[Dict[str, float]]) -> '_Sums':
        done = dict(totals or {})
        return cls(float(done.get('loss_sum', 0.0)), int(done.get('images', 0)), int(done.get('skipped', 0)),
                   float(done.get('data_wait_s', 0.0)), time.perf_counter() - float(done.get('time_s', 0.0)))

    def count(self, verdict: Verdict) -> None:
        if verdict.ok:
            self.loss_sum += verdict.loss_sum
            self.images += verdict.images
        else:
            self.skipped += 1

    def saved(self) -> Dict[str, float]:
        """``state.totals``: what a checkpoint keeps of the sums (``state.TrainState``)."""
        return {'loss_sum': self.loss_sum, 'images': self.images, 'skipped': self.skipped,
                'time_s': time.perf_counter() - self.started, 'data_wait_s': self.data_wait_s}

    def rates(self, processes: int):
        """Images per second on all processes so far, and the share of the time spent waiting for data."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return self.images * processes / elapsed, self.data_wait_s / elapsed

    def epoch_stats(self, accelerator, lr: float) -> EpochStats:
        """The epoch's ``EpochStats``: this process's sums reduced over the processes."""
        elapsed = time.perf_counter() - self.started
        sums = torch.tensor([self.loss_sum, float(self.images), self.data_wait_s], dtype=torch.float64,
                            device=accelerator.device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction='sum')
        images_total = int(sums[1].item())
        data_wait = sums[2].item() / accelerator.num_processes  # the processes' mean
        return EpochStats(loss=sums[0].item() / max(images_total, 1), lr=lr,
                          images_per_s=images_total / max(elapsed, 1e-9), images=images_total, time_s=elapsed,
                          data_wait_s=data_wait, data_wait_fraction=data_wait / max(elapsed, 1e-9),
                          skipped=self.skipped)


def _progress_bar(parts, desc: str, start_step: int, n_batches: int):
    """The epoch's tqdm bar (main process, ``progress``); a disabled one still takes the numbers."""
    from tqdm import tqdm
    return tqdm(total=n_batches, initial=start_step, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (parts.progress and parts.accelerator.is_main_process), mininterval=1.0)


def _on_device(parts, images: torch.Tensor, targets: torch.Tensor):
    """A batch on the run's device, mixed / cut by the recipe's mixup."""
    device = parts.accelerator.device
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if parts.mixup_fn is not None:
        images, targets = parts.mixup_fn(images, targets)
    return images, targets


def _forward_backward(parts, faults: UpdateFaults, images, targets, update: int, accum: int,
                      group: int) -> torch.Tensor:
    """One micro-batch's forward and backward; returns its loss. ``accelerator.backward`` divides by ``accum``, so
    a short last ``group``'s loss is scaled back up: every update's gradient is its micro-batches' mean."""
    with record_function('forward'):  # the labels of a step's profile (benchmarks/training.py)
        output = parts.model(images)
        loss = faults.loss(parts.loss_fn(output.float(), targets), update)
    with record_function('backward'):
        parts.accelerator.backward(loss * (accum / group) if group < accum else loss)
    return loss


def _update(parts, guard: UpdateGuard, faults: UpdateFaults, update: int, where: str) -> Verdict:
    """One optimizer update after its micro-batches' backward: clipping, the non-finite verdict, the optimizer
    step (or a skipped one), the EMA and the per-update schedule. Returns the verdict."""
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    with record_function('optimizer'):
        faults.grads(model, update)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), parts.clip_grad) if parts.clip_grad else None
        verdict = guard.verdict(model, update, where, grad_norm)
        if verdict.ok:
            optimizer.step()
            faults.weights(model, update)
        elif getattr(accelerator, 'scaler', None) is not None:  # fp16: let the loss scaler skip it (and back off)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float('nan'))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if parts.model_ema is not None and verdict.ok:
        with record_function('ema'):
            parts.model_ema.update(parts.raw_model, step=update)
    parts.lr_scheduler.step_update(num_updates=update)
    return verdict


def _log_progress(bar, tracker, desc: str, step: int, n_batches: int, update: int, verdict: Verdict, lr: float,
                  rate: float, wait: float) -> None:
    """The progress bar's numbers, or a log line where there is no bar (a log file: redrawn bars would fill it),
    and the trackers' per-update values (results.RunRecords)."""
    bar.set_postfix(loss=f"{verdict.loss:.4f}", lr=f'{lr:.2e}', img_s=f'{rate:.0f}', data=f'{wait:.0%}',
                    refresh=False)
    if bar.disable:
        log.info('%s  step %d/%d  update %d  loss %.4f  lr %.2e  %.0f img/s  data wait %.0f%%', desc, step, n_batches,
                 update, verdict.loss, lr, rate, 100 * wait)
    if tracker is not None:
        values = {'train/lr': lr, 'train/step_images_per_s': rate, 'train/data_wait_fraction': wait}
        if verdict.ok:
            values['train/loss'] = verdict.loss
        if verdict.grad_norm is not None:  # the clipping's own norm, before clipping
            values['train/grad_norm'] = verdict.grad_norm
        tracker.log(values, update)


def _timed(loader, sums: _Sums):
    """``loader``'s batches, adding the seconds each took to arrive to ``sums.data_wait_s``: the time the training
    loop waited for data (decoding and augmentation that the loader workers did not finish ahead)."""
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            with record_function('data'):
                batch = next(batches)
        except StopIteration:
            return
        sums.data_wait_s += time.perf_counter() - asked
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator=None, progress: bool = False, desc: str = 'eval',
             autocast: Optional[Callable] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy ``loss`` and ``images_per_s`` over ``loader``.

    With an ``accelerator`` the batches go to its device under its mixed precision, and per-sample results
    are gathered across processes with ``gather_for_metrics`` (a loader passed through
    ``accelerator.prepare`` is sharded, and the padding samples of its last batch are dropped). Without
    one, the model's own device is used, under ``autocast`` (a context-manager factory, e.g. the bf16
    autocast a run evaluated with; default: none). Also returns ``num_images``.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    if accelerator is not None:
        device = accelerator.device
        autocast = accelerator.autocast
    else:
        device = next(model.parameters()).device
        autocast = autocast or contextlib.nullcontext
    is_main = accelerator is None or accelerator.is_main_process
    sums = torch.zeros(3, dtype=torch.float64)
    count = 0
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                                disable=not (progress and is_main)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            output = model(images)
        output = output.float()
        loss = F.cross_entropy(output, targets, reduction='none')
        k = min(5, output.shape[-1])
        correct = output.topk(k, dim=-1).indices.eq(targets.unsqueeze(-1))
        per_sample = torch.stack([loss, correct[:, :1].any(-1).float(), correct.any(-1).float()], dim=-1)
        if accelerator is not None and accelerator.num_processes > 1:
            per_sample = accelerator.gather_for_metrics(per_sample)
        sums += per_sample.double().sum(0).cpu()
        count += per_sample.shape[0]
    elapsed = time.perf_counter() - start
    model.train(was_training)
    n = max(count, 1)
    return {
        'top1': 100.0 * sums[1].item() / n,
        'top5': 100.0 * sums[2].item() / n,
        'loss': sums[0].item() / n,
        'images_per_s': count / max(elapsed, 1e-9),
        'num_images': count,
    }
