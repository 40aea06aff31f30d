"""What the training loop does about faults: non-finite losses and gradients, and the per-update log.

Non-finite guard (config ``nonfinite: stop | skip``): after every optimizer update's backward pass the mean
loss of the update (over micro-batches and processes) and the gradient norm are checked before the
optimizer steps. Non-finite either one:

* ``stop``: ``NonFiniteError``, one line naming the epoch, the step and the value; the weights are never
  updated with it, so the last checkpoint written is a good one (exit status 3);
* ``skip``: the update's gradients are dropped (no optimizer or EMA step; the schedule still advances), a
  warning names the step and the value, and the count goes to results.json (``nonfinite_skipped``).

Every process reaches the same verdict: the loss is summed over processes (one NaN makes the sum NaN) and the
gradients are already all-reduced. Under fp16 mixed precision the gradient check is left to the loss scaler
(an inf gradient there is routine: the scaler skips the step and lowers its scale).

Per-update log (config ``step_log: true``): ``<run>/steps.jsonl``, one JSON line per optimizer update with the
epoch, the step within the epoch (micro-batches done), the update number, the mean loss over the update's
images on all processes, and the learning rate. On ``resume=`` the lines up to the checkpoint are carried
over and the rest dropped, so the file of a killed-and-resumed run is the file of an uninterrupted one.

Test hook, never for real runs: ``VIT_GKA_TEST_NONFINITE=<update>[:loss|:grad]`` poisons that update (1-based):
its loss is multiplied by NaN (``loss``, the default) or one gradient is set to inf (``grad``).
"""
import json
import logging
import math
import os
from typing import Any, Dict, Optional

import torch

from vit_gka.errors import NonFiniteError, UserError

__all__ = ['NonFiniteError', 'UpdateGuard', 'StepLog', 'NONFINITE_POLICIES', 'POISON_ENV']

log = logging.getLogger('vit_gka.train')

NONFINITE_POLICIES = ('stop', 'skip')
POISON_ENV = 'VIT_GKA_TEST_NONFINITE'




def _poison() -> Optional[tuple]:
    spec = os.environ.get(POISON_ENV)
    if not spec:
        return None
    update, _, kind = spec.partition(':')
    return int(update), kind or 'loss'


class UpdateGuard:
    """Collects one optimizer update's micro-batch losses and decides, at the update, whether it may step."""

    def __init__(self, accelerator, policy: str = 'stop'):
        if policy not in NONFINITE_POLICIES:
            raise UserError(f"nonfinite must be stop or skip, not '{policy}'")
        self.accelerator = accelerator
        self.policy = policy
        self.poison = _poison()
        self.check_grads = getattr(accelerator, 'scaler', None) is None
        self.loss_sum, self.images = 0.0, 0

    def loss(self, loss: torch.Tensor, update: int) -> torch.Tensor:
        """The micro-batch loss to back-propagate (poisoned when the test hook says so)."""
        if self.poison is not None and self.poison == (update, 'loss'):
            return loss * float('nan')
        return loss

    def add(self, loss_value: float, images: int) -> None:
        self.loss_sum += loss_value * images
        self.images += images

    def grads(self, model, update: int) -> None:
        """After backward, before clipping: poison a gradient when the test hook says so."""
        if self.poison is not None and self.poison == (update, 'grad'):
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float('inf'))

    def verdict(self, model, update: int, where: str, grad_norm: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """At the update (after backward, before the optimizer step): ``{'ok', 'loss', 'loss_sum', 'images'}``
        with ``loss`` the mean over all processes' images; raises ``NonFiniteError`` under ``stop``."""
        params = [p for p in model.parameters() if p.grad is not None]
        totals = torch.tensor([self.loss_sum, float(self.images)], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction='sum').cpu()
        mean = totals[0].item() / max(totals[1].item(), 1.0)
        problem = None
        if not math.isfinite(mean):
            problem = f'non-finite loss {mean}'
        elif self.check_grads and params:
            if grad_norm is None:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            norm = float(grad_norm)
            if not math.isfinite(norm):
                problem = f'non-finite gradient (norm {norm})'
        out = {'ok': problem is None, 'loss': mean, 'loss_sum': self.loss_sum, 'images': self.images}
        self.loss_sum, self.images = 0.0, 0
        if problem is not None:
            message = f'{problem} at {where} (update {update})'
            if self.policy == 'stop':
                raise NonFiniteError(message + '; stopped before the optimizer step')
            log.warning('%s; update skipped (nonfinite=skip)', message)
        return out


class StepLog:
    """``<run>/steps.jsonl`` (main process only; a no-op elsewhere or when disabled)."""

    NAME = 'steps.jsonl'

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, self.NAME) if enabled else None
        self._file = None

    def carry_over(self, source_run_dir: Optional[str], upto_update: int) -> None:
        """Start from the source run's lines up to update ``upto_update`` (resume); a fresh file otherwise."""
        if self.path is None:
            return
        from vit_gka.train.checkpoint import write_text
        lines = []
        source = os.path.join(source_run_dir, self.NAME) if source_run_dir else None
        if source and os.path.isfile(source):
            with open(source) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # the last line of a killed run may be cut short
                        continue
                    if isinstance(record, dict) and int(record.get('update', 0)) <= upto_update:
                        lines.append(json.dumps(record) + '\n')
        write_text(self.path, ''.join(lines))

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, 'a')
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
