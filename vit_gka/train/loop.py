"""The training and evaluation loops, DeiT-engine style (``train_one_epoch`` / ``evaluate``), on Accelerate, and
the non-finite guard of every optimizer update.

``train_one_epoch`` does one pass over the training loader: mixup / cutmix, forward (under Accelerate's
mixed precision), backward, gradient accumulation, gradient clipping, the non-finite check, the optimizer
step, the EMA update and the per-update learning-rate schedule, then the caller's per-update hook (steps.jsonl,
mid-epoch checkpoints). ``evaluate`` returns top-1 / top-5 / loss / images per second over a whole loader,
gathered across processes.

Non-finite guard (config ``nonfinite: stop | skip``, ``UpdateGuard``): after every optimizer update's backward
pass the mean loss of the update (over micro-batches and processes) and the gradient norm are checked before
the optimizer steps. Non-finite either one:

* ``stop``: ``NonFiniteError``, one line naming the epoch, the step and the value; the weights are never
  updated with it, so the last checkpoint written is a good one (exit status 3);
* ``skip``: the update's gradients are dropped (no optimizer or EMA step; the schedule still advances), a
  warning names the step and the value, and the count goes to results.json (``nonfinite_skipped``).

Every process reaches the same verdict: the loss is summed over processes (one NaN makes the sum NaN) and the
gradients are already all-reduced. Under fp16 mixed precision the gradient check is left to the loss scaler
(an inf gradient there is routine: the scaler skips the step and lowers its scale).

Weights that turn non-finite although the loss and the gradient were finite (an lr so large that the step
overflows) are caught where they would be kept: no checkpoint, best.safetensors or model/ is written from them
(state.require_finite), and the run stops as under ``stop``, naming the last good checkpoint.

Test hook, never for real runs: ``VIT_GKA_TEST_NONFINITE=<update>[:loss|:grad|:weight]`` poisons that update
(1-based): its loss is multiplied by NaN (``loss``, the default), one gradient is set to inf (``grad``), or one
weight is set to inf after its optimizer step (``weight``). ``VIT_GKA_TEST_RAISE=<update>`` raises a
``RuntimeError`` (a bug, not a user error) at that update, to test that every exit path ends the loader workers.
"""
import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from vit_gka.errors import NonFiniteError, UserError

__all__ = ['train_one_epoch', 'evaluate', 'sigma_stats', 'UpdateGuard', 'NONFINITE_POLICIES', 'POISON_ENV']

log = logging.getLogger('vit_gka.train')

NONFINITE_POLICIES = ('stop', 'skip')
POISON_ENV = 'VIT_GKA_TEST_NONFINITE'
RAISE_ENV = 'VIT_GKA_TEST_RAISE'


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


def _poison() -> Optional[tuple]:
    spec = os.environ.get(POISON_ENV)
    if not spec:
        return None
    update, _, kind = spec.partition(':')
    return int(update), kind or 'loss'


class UpdateGuard:
    """Collects one optimizer update's micro-batch losses and decides, at the update, whether it may step."""

    def __init__(self, accelerator, policy: str = 'stop', stop=None):
        if policy not in NONFINITE_POLICIES:
            raise UserError(f"nonfinite must be stop or skip, not '{policy}'")
        self.accelerator = accelerator
        self.policy = policy
        self.stop = stop  # preemption.StopSignals: its flags ride on the loss all-reduce, so every process agrees
        self.poison = _poison()
        self.check_grads = getattr(accelerator, 'scaler', None) is None
        # the update's loss sum stays a tensor on the device (float64 but on Apple's MPS, which has none): the
        # only host sync of an update is its verdict, however many micro-batches it has
        self.dtype = torch.float32 if accelerator.device.type == 'mps' else torch.float64
        self.loss_sum, self.images = None, 0

    def loss(self, loss: torch.Tensor, update: int) -> torch.Tensor:
        """The micro-batch loss to back-propagate (poisoned when the test hook says so)."""
        if self.poison is not None and self.poison == (update, 'loss'):
            return loss * float('nan')
        return loss

    def add(self, loss: torch.Tensor, images: int) -> None:
        """A micro-batch's mean loss over its ``images`` (a tensor: read at the update's verdict)."""
        value = loss.detach().to(self.dtype) * images
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.images += images

    def grads(self, model, update: int) -> None:
        """After backward, before clipping: poison a gradient when the test hook says so."""
        if self.poison is not None and self.poison == (update, 'grad'):
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float('inf'))

    def weights(self, model, update: int) -> None:
        """After the optimizer step: poison a weight, or fail, when a test hook says so."""
        if os.environ.get(RAISE_ENV) == str(update):
            raise RuntimeError(f'{RAISE_ENV}: a failure injected at update {update}')
        if self.poison is not None and self.poison == (update, 'weight'):
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float('inf'))

    def verdict(self, model, update: int, where: str, grad_norm: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """At the update (after backward, before the optimizer step): ``{'ok', 'loss', 'loss_sum', 'images',
        'grad_norm', 'stop'}`` with ``loss`` the mean over all processes' images, ``loss_sum`` / ``images`` this
        process's, ``grad_norm`` the gradient norm (the clipping's, before clipping; None when not computed) and
        ``stop`` the stop signal any process has received (None: none); raises ``NonFiniteError`` under ``stop``.
        One host sync: every number comes back in one ``tolist``."""
        params = [p for p in model.parameters() if p.grad is not None]
        flags = self.stop.flags() if self.stop is not None else []
        device = self.accelerator.device
        own = self.loss_sum if self.loss_sum is not None else torch.zeros((), dtype=self.dtype, device=device)
        totals = torch.cat([own.reshape(1), torch.tensor([float(self.images), *flags], dtype=self.dtype,
                                                          device=own.device)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.clone(), reduction='sum')
        if grad_norm is None and self.check_grads and params:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = grad_norm.detach().reshape(1).to(totals) if grad_norm is not None else totals[:0]
        own_sum, total, images, *rest = torch.cat([own.reshape(1).to(totals), totals, norm]).tolist()  # one sync
        flags, norm = (rest[:-1], rest[-1]) if grad_norm is not None else (rest, None)
        mean = total / max(images, 1.0)
        problem = None
        if not math.isfinite(mean):
            problem = f'non-finite loss {mean}'
        elif self.check_grads and norm is not None and not math.isfinite(norm):
            problem = f'non-finite gradient (norm {norm})'
        out = {'ok': problem is None, 'loss': mean, 'loss_sum': own_sum, 'images': self.images,
               'grad_norm': norm, 'stop': self.stop.name(flags) if self.stop is not None else None}
        self.loss_sum, self.images = None, 0
        if problem is not None:
            message = f'{problem} at {where} (update {update})'
            if self.policy == 'stop':
                raise NonFiniteError(message + '; stopped before the optimizer step')
            log.warning('%s; update skipped (nonfinite=skip)', message)
        return out


def train_one_epoch(parts, state, epoch: int, loader, on_update: Optional[Callable[[Dict[str, Any]], None]] = None,
                    tracker=None, desc: str = '') -> Dict[str, float]:
    """One epoch, or its rest, of the run ``parts`` (``state.TrainParts``: model, optimizer, schedule, loss,
    mixup, EMA, clipping, non-finite policy, logging), advancing ``state`` (``state.TrainState``) update by
    update: ``num_updates``, ``step`` (micro-batches of this epoch done) and ``totals`` (this process's sums so
    far: ``loss_sum``, ``images``, ``skipped``, ``time_s``, ``data_wait_s``). Returns ``loss`` (mean over the
    epoch and processes), ``lr`` (last), ``images_per_s`` (all processes together), ``images``, ``time_s``,
    ``data_wait_s`` / ``data_wait_fraction`` (time spent waiting for the loader, the processes' mean, and its
    share of ``time_s``) and ``skipped`` (updates dropped for a non-finite loss or gradient).

    Gradient accumulation: ``accelerator.gradient_accumulation_steps`` micro-batches per optimizer step
    (``accelerator.backward`` divides the loss by it; gradients are not all-reduced until the last
    micro-batch); a shorter last group at the end of the epoch still steps, with the mean over its own
    micro-batches. The schedule is stepped per optimizer update (``lr_scheduler.step_update``), the EMA after
    every update.

    Mid-epoch resume: ``loader`` yields the epoch's batches from ``state.step`` on (``skip_first_batches``)
    and ``state.totals`` are this process's sums over the first ``state.step``. ``on_update(info)`` is called
    after every update (``state`` already advanced) with ``epoch``, ``step``, ``update``, ``loss`` (mean over the
    update's images on all processes; None when not finite), ``lr``, ``skipped`` and ``stop`` (the stop signal
    that any process has received by this update, the same on every process; None: none; see preemption.py).
    """
    from tqdm import tqdm

    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    model.train()
    accum = max(1, int(getattr(accelerator, 'gradient_accumulation_steps', 1)))
    device = accelerator.device
    start_step = state.step
    n_batches = start_step + len(loader)
    done = dict(state.totals or {})
    loss_sum = float(done.get('loss_sum', 0.0))
    n_seen = int(done.get('images', 0))
    skipped = int(done.get('skipped', 0))
    guard = UpdateGuard(accelerator, parts.nonfinite, getattr(parts, 'stop', None))
    desc = desc or f'epoch {epoch + 1}'
    bar = tqdm(total=n_batches, initial=start_step, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (parts.progress and accelerator.is_main_process), mininterval=1.0)
    start = time.perf_counter() - float(done.get('time_s', 0.0))
    waited = [float(done.get('data_wait_s', 0.0))]  # seconds this process spent waiting for batches
    lr = optimizer.param_groups[0]['lr']
    for step, (images, targets) in enumerate(_timed(loader, waited), start=start_step):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if parts.mixup_fn is not None:
            images, targets = parts.mixup_fn(images, targets)
        sync = (step + 1) % accum == 0 or step + 1 == n_batches
        ctx = contextlib.nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model)
        update = state.num_updates + 1
        # micro-batches of this update: accum, fewer in an epoch's last group; accelerator.backward divides by
        # accum, so a short group's loss is scaled back up: every update's gradient is its micro-batches' mean
        group = min(accum, n_batches - step // accum * accum)
        with ctx:
            with record_function('forward'):  # the labels of a step's profile (benchmarks/training.py)
                output = model(images)
                loss = guard.loss(parts.loss_fn(output.float(), targets), update)
            with record_function('backward'):
                accelerator.backward(loss * (accum / group) if group < accum else loss)
        guard.add(loss, images.shape[0])
        bar.update(1)
        if not sync:
            continue
        with record_function('optimizer'):
            guard.grads(model, update)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), parts.clip_grad) if parts.clip_grad else None
            verdict = guard.verdict(model, update, f'epoch {epoch + 1}, step {step + 1}', grad_norm)
            if verdict['ok']:
                optimizer.step()
                guard.weights(model, update)
                loss_sum += verdict['loss_sum']
                n_seen += verdict['images']
            else:
                skipped += 1
                if getattr(accelerator, 'scaler', None) is not None:  # fp16: let the loss scaler skip it (and back off)
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.fill_(float('nan'))
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.num_updates = update
        if parts.model_ema is not None and verdict['ok']:
            with record_function('ema'):
                parts.model_ema.update(parts.raw_model, step=update)
        parts.lr_scheduler.step_update(num_updates=update)
        lr = optimizer.param_groups[0]['lr']
        state.step = step + 1
        state.totals = {'loss_sum': loss_sum, 'images': n_seen, 'skipped': skipped,
                        'time_s': time.perf_counter() - start, 'data_wait_s': waited[0]}
        if on_update is not None:
            on_update({'epoch': epoch, 'step': step + 1, 'update': update,
                       'loss': verdict['loss'] if math.isfinite(verdict['loss']) else None, 'lr': lr,
                       'skipped': not verdict['ok'], 'stop': verdict['stop']})
        if update % parts.log_interval == 0 or step + 1 == n_batches:
            elapsed = max(time.perf_counter() - start, 1e-9)
            rate, wait = n_seen * accelerator.num_processes / elapsed, waited[0] / elapsed
            bar.set_postfix(loss=f"{verdict['loss']:.4f}", lr=f'{lr:.2e}', img_s=f'{rate:.0f}', data=f'{wait:.0%}',
                            refresh=False)
            if bar.disable:  # no bar (a log file: redrawn bars would fill it): a line instead
                log.info('%s  step %d/%d  update %d  loss %.4f  lr %.2e  %.0f img/s  data wait %.0f%%', desc,
                         step + 1, n_batches, update, verdict['loss'], lr, rate, 100 * wait)
            if tracker is not None:  # results.RunRecords: every tracker of log_with
                values = {'train/lr': lr, 'train/step_images_per_s': rate, 'train/data_wait_fraction': wait}
                if verdict['ok']:
                    values['train/loss'] = verdict['loss']
                if verdict['grad_norm'] is not None:  # the clipping's own norm, before clipping
                    values['train/grad_norm'] = verdict['grad_norm']
                tracker.log(values, update)
    bar.close()
    elapsed = time.perf_counter() - start
    sums = torch.tensor([loss_sum, float(n_seen), waited[0]], dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction='sum')
    images_total = int(sums[1].item())
    data_wait = sums[2].item() / accelerator.num_processes  # the processes' mean
    return {
        'loss': sums[0].item() / max(images_total, 1),
        'lr': lr,
        'images_per_s': images_total / max(elapsed, 1e-9),
        'images': images_total,
        'time_s': elapsed,
        'data_wait_s': data_wait,
        'data_wait_fraction': data_wait / max(elapsed, 1e-9),
        'skipped': skipped,
    }


def _timed(loader, waited: list):
    """``loader``'s batches, adding the seconds each took to arrive to ``waited[0]``: the time the training
    loop waited for data (decoding and augmentation that the loader workers did not finish ahead)."""
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            with record_function('data'):
                batch = next(batches)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - asked
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
