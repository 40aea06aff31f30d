"""Checks of a training configuration's values, each failure one ``UserError`` line that names the key, the
value and what to give instead. ``train.py`` runs ``validate`` on the command line's configuration before
Hydra creates the run folder (``check_overrides(..., validate=validate)``), and ``run_training`` runs it again.
"""
import numbers
import os

from vit_gka.errors import UserError

__all__ = ['validate', 'check_output_dir']

# key -> (what it is, smallest value); the optional ones may be null
_INTS = {
    'epochs': ('the number of training epochs', 1),
    'batch_size': ('images per process and step', 1),
    'seed': ('the random seed', 0),
    'grad_accum': ('micro-batches per optimizer step', 1),
    'workers': ('data loader processes', 0),
    'log_interval': ('steps between progress updates', 1),
    'lr_base_size': ('the batch size lr is given for', 1),
}
_OPTIONAL_INTS = {
    'train_subset': ('the number of training images used', 1),
    'stop_epoch': ('the epoch to stop after', 1),
    'eval_batch_size': ('images per evaluation step', 1),
    'eval_interval': ('epochs between evaluations', 0),
    'checkpoint_every_steps': ('optimizer updates between mid-epoch checkpoints', 1),
}
# model.args keys of the GKA / kernel attention: (test, what it must be, what to give instead)
_MODEL_ARGS = {
    'sigma_init': (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0,
                   'a number > 0 (the initial bandwidth)', 'a positive number, or leave it out for the default'),
    'window': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               'a positive number of tokens', 'an integer >= 1, or null for no window'),
    'window_2d': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  'a radius >= 0 in patches', 'an integer >= 0, or null for no 2-D window'),
}


def _int_check(cfg, key: str, what: str, low: int, optional: bool) -> None:
    value = cfg.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = 'an integer' if isinstance(value, bool) or not isinstance(value, int) else f'>= {low}'
        raise UserError(f'{key} must be {kind} ({what}), got {value!r}; set {key}=<integer >= {low}>'
                        + (' or null' if optional else ''))


def validate(cfg) -> None:
    """``UserError`` for a value of the wrong type or range (``batch_size=0``, ``epochs=-1``,
    ``model.args.sigma_init=0``, ``nonfinite=maybe``)."""
    for key, (what, low) in _INTS.items():
        _int_check(cfg, key, what, low, optional=False)
    for key, (what, low) in _OPTIONAL_INTS.items():
        _int_check(cfg, key, what, low, optional=True)
    lr = cfg.get('lr')
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise UserError(f'lr must be a positive number (base learning rate per lr_base_size images), got {lr!r}; '
                        f'set lr=<number > 0>')
    choices = {'mixed_precision': ('auto', 'no', 'bf16', 'fp16', 'fp8'), 'nonfinite': ('stop', 'skip')}
    for key, allowed in choices.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}; set {key}={allowed[0]}")
    if not isinstance(cfg.get('step_log', True), bool):
        raise UserError(f"step_log must be true or false, got {cfg.get('step_log')!r}")
    model = cfg.get('model')
    args = model.get('args') if model is not None else None
    for key, (ok, what, instead) in _MODEL_ARGS.items():
        value = args.get(key) if args is not None else None
        if value is not None and not ok(value):
            raise UserError(f'model.args.{key} must be {what}, got {value!r}; give model.args.{key}=<{instead}>')


def check_output_dir(path: str, key: str = 'hydra.run.dir') -> str:
    """``UserError`` when the folder ``path`` cannot be created or written (its nearest existing ancestor is
    a file, or is not writable); else that nearest existing ancestor (``path`` itself if it exists)."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    probe = full
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f'cannot create the output folder {path}: {probe} is a file; choose another {key}=<folder>')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'cannot write the output folder {path}: {probe} is not writable; '
                        f'choose another {key}=<folder>')
    return probe
