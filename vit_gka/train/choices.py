"""The settings that take one of a few values, and the one check of them: training's (validation.py, the recipe, the
non-finite guard) and eval.py's. A module of its own, below everything that checks a value, so that none of them
imports another to get it."""
from typing import Dict

from vit_gka.errors import UserError

__all__ = ['CHOICES', 'EVAL_CHOICES', 'check_choice']

# key -> the values it takes, the first the one a message suggests (lr_scale: checked where recipe.scaled_lr reads
# it, which also takes null for none)
CHOICES = {
    'mixed_precision': ('auto', 'no', 'bf16', 'fp16', 'fp8'),
    'nonfinite': ('stop', 'skip'),
    'lr_scale': ('linear', 'sqrt', 'none'),
}
# eval.py's settings: the autocast it evaluates under (auto: the run's own, bf16 for an fp8 run) and which weights
# of a checkpoint folder
EVAL_CHOICES = {
    'mixed_precision': ('auto', 'no', 'bf16', 'fp16'),
    'weights': ('model', 'ema'),
}


def check_choice(key: str, value, choices: Dict[str, tuple] = CHOICES):
    """``value`` if it is one of ``choices[key]``, else ``UserError`` naming them."""
    allowed = choices[key]
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}; set {key}={allowed[0]}")
    return value
