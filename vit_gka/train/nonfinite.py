"""The non-finite guard of every optimizer update (``UpdateGuard``), used by ``loop.train_one_epoch``.

Config ``nonfinite: stop | skip``: after every optimizer update's backward
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

The tests' non-finite updates (``VIT_GKA_TEST_NONFINITE``) are faults.py's.
"""
import dataclasses
import logging
import math
from typing import Optional

import torch

from vit_gka.errors import NonFiniteError
from vit_gka.train.choices import check_choice

__all__ = ['UpdateGuard', 'Verdict']

log = logging.getLogger('vit_gka.train')



@dataclasses.dataclass
class Verdict:
    """One optimizer update's verdict (``UpdateGuard.verdict``): may the optimizer step, and the update's numbers."""
    ok: bool                    # loss and gradient norm finite: the optimizer may step
    loss: float                 # the update's mean loss over all processes' images (nan or inf when not finite)
    loss_sum: float             # this process's loss summed over its images of the update
    images: int                 # this process's images of the update
    grad_norm: Optional[float]  # the gradient norm (the clipping's, before clipping); None when not computed
    stop: Optional[str]         # the stop signal any process has received by this update (preemption.py); None: none


class UpdateGuard:
    """Collects one optimizer update's micro-batch losses and decides, at the update, whether it may step."""

    def __init__(self, accelerator, policy: str = 'stop', stop=None):
        self.accelerator = accelerator
        self.policy = check_choice('nonfinite', policy)
        self.stop = stop  # preemption.StopSignals: its flags ride on the loss all-reduce, so every process agrees
        self.check_grads = getattr(accelerator, 'scaler', None) is None
        # the update's loss sum stays a tensor on the device (float64 but on Apple's MPS, which has none): the
        # only host sync of an update is its verdict, however many micro-batches it has
        self.dtype = torch.float32 if accelerator.device.type == 'mps' else torch.float64
        self.loss_sum, self.images = None, 0

    def add(self, loss: torch.Tensor, images: int) -> None:
        """A micro-batch's mean loss over its ``images`` (a tensor: read at the update's verdict)."""
        value = loss.detach().to(self.dtype) * images
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.images += images

    def verdict(self, model, update: int, where: str, grad_norm: Optional[torch.Tensor] = None) -> Verdict:
        """At the update (after backward, before the optimizer step): the ``Verdict``; raises ``NonFiniteError``
        under ``stop``. One host sync: every number comes back in one ``tolist``."""
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
        out = Verdict(ok=problem is None, loss=mean, loss_sum=own_sum, images=self.images, grad_norm=norm,
                      stop=self.stop.name(flags) if self.stop is not None else None)
        self.loss_sum, self.images = None, 0
        if problem is not None:
            message = f'{problem} at {where} (update {update})'
            if self.policy == 'stop':
                raise NonFiniteError(message + '; stopped before the optimizer step')
            log.warning('%s; update skipped (nonfinite=skip)', message)
        return out
