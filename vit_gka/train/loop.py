"""The training and evaluation loops, DeiT-engine style (``train_one_epoch`` / ``evaluate``), on Accelerate.

``train_one_epoch`` does one pass over the training loader: mixup / cutmix, forward (under Accelerate's
mixed precision), backward, gradient accumulation, gradient clipping, the optimizer step, the EMA update
and the per-step learning-rate schedule, with the non-finite guard and the per-update hook of faults.py
(mid-epoch checkpoints, ``steps.jsonl``). ``evaluate`` returns top-1 / top-5 / loss / images per second
over a whole loader, gathered across processes.
"""
import contextlib
import math
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['train_one_epoch', 'evaluate', 'sigma_stats']


def _unwrap(model: nn.Module, accelerator=None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, 'module', model)


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


def train_one_epoch(
        model: nn.Module,
        loader,
        optimizer,
        loss_fn: Callable,
        accelerator,
        epoch: int,
        lr_scheduler=None,
        num_updates: int = 0,
        mixup_fn: Optional[Callable] = None,
        model_ema=None,
        clip_grad: Optional[float] = None,
        tb_writer=None,
        log_interval: int = 50,
        progress: bool = True,
        desc: str = '',
        start_step: int = 0,
        totals: Optional[Dict[str, float]] = None,
        nonfinite: str = 'stop',
        on_update: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, float]:
    """One epoch, or its rest. Returns ``loss`` (mean over the epoch and processes), ``lr`` (last),
    ``images_per_s`` (all processes together), ``images``, ``time_s``, ``num_updates`` (optimizer updates so
    far) and ``skipped`` (updates dropped for a non-finite loss or gradient, see faults.py).

    Gradient accumulation: ``accelerator.gradient_accumulation_steps`` micro-batches per optimizer step
    (``accelerator.backward`` divides the loss by it; gradients are not all-reduced until the last
    micro-batch); a shorter last group at the end of the epoch still steps. The schedule is stepped per
    optimizer update (``lr_scheduler.step_update``), the EMA after every update.

    Mid-epoch resume: ``loader`` yields the epoch's batches from ``start_step`` on (``skip_first_batches``)
    and ``totals`` are this process's sums over the first ``start_step`` (``loss_sum``, ``images``,
    ``time_s``, ``skipped``). ``on_update(info)`` is called after every update with ``epoch``, ``step``
    (micro-batches done), ``update``, ``loss`` (mean over the update's images on all processes; None when
    not finite), ``lr``, ``skipped`` and this process's running ``totals``.
    """
    from tqdm import tqdm

    from vit_gka.train.faults import UpdateGuard

    model.train()
    accum = max(1, int(getattr(accelerator, 'gradient_accumulation_steps', 1)))
    device = accelerator.device
    n_batches = start_step + len(loader)
    done = dict(totals or {})
    loss_sum = float(done.get('loss_sum', 0.0))
    n_seen = int(done.get('images', 0))
    skipped = int(done.get('skipped', 0))
    guard = UpdateGuard(accelerator, nonfinite)
    bar = tqdm(total=n_batches, initial=start_step, desc=desc or f'epoch {epoch + 1}', leave=False,
               dynamic_ncols=True, disable=not (progress and accelerator.is_main_process), mininterval=1.0)
    start = time.perf_counter() - float(done.get('time_s', 0.0))
    lr = optimizer.param_groups[0]['lr']
    for step, (images, targets) in enumerate(loader, start=start_step):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        sync = (step + 1) % accum == 0 or step + 1 == n_batches
        ctx = contextlib.nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model)
        with ctx:
            output = model(images)
            loss = guard.loss(loss_fn(output.float(), targets), num_updates + 1)
            accelerator.backward(loss)
        loss_value = loss.detach().float().item()
        guard.add(loss_value, images.shape[0])
        bar.update(1)
        if not sync:
            continue
        guard.grads(model, num_updates + 1)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad) if clip_grad else None
        where = f'epoch {epoch + 1}, step {step + 1}'
        verdict = guard.verdict(model, num_updates + 1, where, grad_norm)
        if verdict['ok']:
            optimizer.step()
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
        num_updates += 1
        if model_ema is not None and verdict['ok']:
            model_ema.update(_unwrap(model, accelerator), step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        lr = optimizer.param_groups[0]['lr']
        if on_update is not None:
            on_update({'epoch': epoch, 'step': step + 1, 'update': num_updates,
                       'loss': verdict['loss'] if math.isfinite(verdict['loss']) else None, 'lr': lr,
                       'skipped': not verdict['ok'],
                       'totals': {'loss_sum': loss_sum, 'images': n_seen, 'skipped': skipped,
                                  'time_s': time.perf_counter() - start}})
        if num_updates % log_interval == 0 or step + 1 == n_batches:
            rate = n_seen * accelerator.num_processes / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', img_s=f'{rate:.0f}', refresh=False)
            if tb_writer is not None and verdict['ok']:
                tb_writer.add_scalar('train/loss', verdict['loss'], num_updates)
                tb_writer.add_scalar('train/lr', lr, num_updates)
    bar.close()
    elapsed = time.perf_counter() - start
    sums = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction='sum')
    images_total = int(sums[1].item())
    return {
        'loss': sums[0].item() / max(images_total, 1),
        'lr': lr,
        'images_per_s': images_total / max(elapsed, 1e-9),
        'images': images_total,
        'time_s': elapsed,
        'num_updates': num_updates,
        'skipped': skipped,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator=None, progress: bool = False, desc: str = 'eval') -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy ``loss`` and ``images_per_s`` over ``loader``.

    With an ``accelerator`` the batches go to its device under its mixed precision, and per-sample results
    are gathered across processes with ``gather_for_metrics`` (a loader passed through
    ``accelerator.prepare`` is sharded, and the padding samples of its last batch are dropped). Without
    one, the model's own device is used. Also returns ``num_images``.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    if accelerator is not None:
        device = accelerator.device
        autocast = accelerator.autocast
    else:
        device = next(model.parameters()).device
        autocast = contextlib.nullcontext
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
