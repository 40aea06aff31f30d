"""Checks of a training configuration's values, each failure one ``UserError`` line that names the key, the
value and what to give instead. ``train.py`` runs ``validate`` on the command line's configuration before
Hydra creates the run folder (``check_overrides(..., validate=validate)``), and ``run_training`` runs it again.
"""
import math
import numbers
import os
from typing import Dict, List, Optional

from vit_gka.cli import CONF_DIR, options
from vit_gka.errors import UserError
from vit_gka.train.choices import check_choice

__all__ = ['validate', 'trackers', 'families',
           'family_names', 'check_model']

# key -> (what it is, smallest value); the optional ones may be null
_INTS = {
    'epochs': ('the number of training epochs', 1),
    'batch_size': ('images per process and step', 1),
    'seed': ('the random seed', 0),
    'grad_accum': ('micro-batches per optimizer step', 1),
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
# float settings with a range: key -> (lowest, highest, highest included, what it is); each also must be finite
_RANGES = {
    'drop_path': (0.0, 1.0, False, 'the stochastic depth rate'),
    'checkpoint_keep': (0, math.inf, False, 'the epoch checkpoints kept beside last, 0 for none'),
    'clip_grad': (0.0, math.inf, False, 'the gradient norm to clip to, or null'),
    'aug.smoothing': (0.0, 1.0, False, 'the label smoothing'),
    'aug.mixup': (0.0, math.inf, False, "mixup's alpha"),
    'aug.cutmix': (0.0, math.inf, False, "cutmix's alpha"),
    'aug.mixup_prob': (0.0, 1.0, True, 'the probability of mixing a batch'),
    'aug.mixup_switch_prob': (0.0, 1.0, True, 'the probability of cutmix instead of mixup'),
    'aug.re_prob': (0.0, 1.0, True, 'the probability of random erasing'),
    'aug.hflip': (0.0, 1.0, True, 'the probability of a horizontal flip'),
    'aug.vflip': (0.0, 1.0, True, 'the probability of a vertical flip'),
    'aug.color_jitter': (0.0, math.inf, False, 'the colour jitter strength'),
    'optim.weight_decay': (0.0, math.inf, False, 'the weight decay'),
    'ema.decay': (0.0, 1.0, True, 'the EMA decay'),
    'sched.warmup_lr': (0.0, math.inf, False, 'the warm-up start lr'),
    'sched.min_lr': (0.0, math.inf, False, 'the lowest lr of the schedule'),
    'sched.warmup_epochs': (0.0, math.inf, False, 'the warm-up epochs'),
    'model.args.drop_rate': (0.0, 1.0, False, 'the dropout rate'),
    'model.args.attn_drop_rate': (0.0, 1.0, False, 'the attention dropout rate'),
    'model.args.proj_drop_rate': (0.0, 1.0, False, 'the projection dropout rate'),
    'model.args.pos_drop_rate': (0.0, 1.0, False, 'the position-embedding dropout rate'),
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


def trackers(log_with) -> list:
    """``log_with`` as Accelerate's list of trackers ([] for none); ``UserError`` for a tracker Accelerate does not
    know or whose package is not installed (Accelerate itself would drop it without a word)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    names = [] if log_with in (None, 'none', False) else [log_with] if isinstance(log_with, str) else list(log_with)
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == 'all':
            continue
        if name not in LoggerType.list():
            raise UserError(f"log_with: unknown tracker {name!r}; choose from {', '.join(LoggerType.list())} or none")
        if name not in available:
            raise UserError(f'log_with: the {name} tracker is not installed (pip install {name}), or set '
                            f'log_with=tensorboard')
    return [str(n) for n in names]


def validate(cfg) -> None:
    """``UserError`` for a value of the wrong type or range (``batch_size=0``, ``epochs=-1``,
    ``model.args.sigma_init=0``, ``nonfinite=maybe``, ``mixed_precision=fp8`` without its GPU and backend, an odd
    ``batch_size`` with mixup / cutmix) or a model timm does not have (``model=eka_fixed shape=base``,
    ``model=timm`` without ``model.name``)."""
    for key, (what, low) in _INTS.items():
        _int_check(cfg, key, what, low, optional=False)
    for key, (what, low) in _OPTIONAL_INTS.items():
        _int_check(cfg, key, what, low, optional=True)
    workers = cfg.get('workers')
    if workers != 'auto':
        _int_check(cfg, 'workers', 'data loader processes per training process, or auto', 0, optional=False)
    _check_finite(cfg)
    _check_ranges(cfg)
    _check_mixup_batch(cfg)
    lr = cfg.get('lr')
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise UserError(f'lr must be a positive number (base learning rate per lr_base_size images), got {lr!r}; '
                        f'set lr=<number > 0>')
    for key in ('mixed_precision', 'nonfinite'):
        check_choice(key, cfg.get(key))
    if cfg.mixed_precision == 'fp8':
        _check_fp8(cfg)
    if cfg.mixed_precision == 'fp16':
        _check_fp16(cfg)
    _check_recipe(cfg)
    trackers(cfg.get('log_with'))
    for key in ('step_log', 'progress', 'save_model', 'cpu'):
        if not isinstance(cfg.get(key), bool) and not (key == 'progress' and cfg.get(key) == 'auto'):
            raise UserError(f'{key} must be true or false{" or auto" if key == "progress" else ""}, '
                            f'got {cfg.get(key)!r}')
    model = cfg.get('model')
    args = model.get('args') if model is not None else None
    for key, (ok, what, instead) in _MODEL_ARGS.items():
        value = args.get(key) if args is not None else None
        if value is not None and not ok(value):
            raise UserError(f'model.args.{key} must be {what}, got {value!r}; give model.args.{key}=<{instead}>')
    img_size = args.get('img_size') if args is not None else None
    sizes = list(img_size) if isinstance(img_size, (list, tuple)) or _is_list(img_size) else [img_size]
    if img_size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
        raise UserError(f'model.args.img_size must be a positive number of pixels (or [height, width]), got '
                        f'{img_size!r}; give model.args.img_size=<integer >= 1>')
    if model is not None:
        check_model(cfg)


def _is_list(value) -> bool:
    from omegaconf import ListConfig
    return isinstance(value, ListConfig)


def _select(cfg, key: str):
    """The value at dotted ``key`` (None where a node is missing or does not resolve)."""
    node = cfg
    for part in key.split('.'):
        try:
            node = node.get(part) if node is not None else None
        except Exception:  # an interpolation that does not resolve here (Hydra's own, before the job)
            return None
    return node


def _check_finite(cfg) -> None:
    """Every float setting finite: ``lr=inf``, ``aug.mixup=nan`` would train nothing or poison the weights."""
    from omegaconf import DictConfig, ListConfig

    def walk(node, prefix):
        items = enumerate(node) if isinstance(node, ListConfig) else ((k, None) for k in node.keys())
        for key, value in items:
            name = f'{prefix}{key}' if isinstance(node, DictConfig) else f'{prefix[:-1]}[{key}]'
            if name == 'hydra':
                continue
            if value is None and isinstance(node, DictConfig):
                try:
                    value = node.get(key)
                except Exception:  # an interpolation that does not resolve here
                    continue
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, name + '.')
            elif isinstance(value, float) and not math.isfinite(value):
                raise UserError(f'{name} must be a finite number, got {value}; set {name}=<a finite number>')

    walk(cfg, '')


def _check_ranges(cfg) -> None:
    for key, (low, high, high_ok, what) in _RANGES.items():
        value = _select(cfg, key)
        if value is None:
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or value < low or value > high or (value == high and not high_ok):
            bound = f'in [{low:g}, {high:g}{"]" if high_ok else ")"}' if high != math.inf else f'>= {low:g}'
            raise UserError(f'{key} must be a number {bound} ({what}), got {value!r}; set {key}=<a number {bound}>')
    subset = _select(cfg, 'data.eval_subset')
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise UserError(f'data.eval_subset must be an integer >= 1 (the first n test images), got {subset!r}; set '
                        f'data.eval_subset=<integer >= 1> or null (the whole test split)')


def _check_recipe(cfg) -> None:
    """The optimizer and the schedule built once on a one-parameter model: an unknown ``optim.opt`` /
    ``sched.sched`` or an argument timm refuses is one line here, not a traceback after the run folder exists."""
    if _select(cfg, 'optim.opt') is None or _select(cfg, 'sched.sched') is None:
        return
    import torch

    from vit_gka.train import recipe
    probe = torch.nn.Linear(1, 1)
    try:
        optimizer = recipe.create_optimizer(probe, cfg.optim, 1e-3)
    except Exception as e:  # noqa: BLE001  (timm raises ValueError, AssertionError, TypeError, ...)
        raise UserError(f'optim: timm cannot create optimizer {cfg.optim.opt!r} ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); set optim.opt=adamw (or another timm '
                        f'optimizer: timm.optim.list_optimizers())') from e
    try:
        scheduler, _ = recipe.create_scheduler(optimizer, cfg, 1)
    except Exception as e:  # noqa: BLE001
        scheduler, error = None, f' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    else:
        error = ''
    if scheduler is None:
        raise UserError(f'sched.sched={cfg.sched.sched!r}: timm has no such per-step schedule{error}; set '
                        f'sched.sched=cosine (or step, multistep, tanh, poly)')


def _check_fp16(cfg) -> None:
    """Accelerate's fp16 autocast needs a CUDA GPU: on the CPU it would train in fp32 and record fp16."""
    import torch
    if cfg.cpu or not torch.cuda.is_available():
        raise UserError('mixed_precision=fp16 needs a CUDA GPU (on the CPU the run would train in fp32); set '
                        'mixed_precision=bf16 or no')


def _check_mixup_batch(cfg) -> None:
    """timm's Mixup (mixup / cutmix) pairs the images of a batch and asserts an even batch: an odd batch_size
    would stop the run at its first step (the last, shorter batch is dropped when mixup is on)."""
    aug = cfg.get('aug')
    if aug is None or cfg.batch_size % 2 == 0:
        return
    on = {f'aug.{k}': f'aug.{k}=0' for k in ('mixup', 'cutmix')
          if isinstance(aug.get(k), numbers.Real) and aug.get(k) > 0}
    if aug.get('cutmix_minmax') is not None:
        on['aug.cutmix_minmax'] = 'aug.cutmix_minmax=null'
    if on:
        raise UserError(f"batch_size must be even with {' and '.join(on)} on (timm's Mixup mixes pairs of images), "
                        f"got {cfg.batch_size}; set batch_size={cfg.batch_size + 1} or {' '.join(on.values())}")


def _check_fp8(cfg) -> None:
    """Accelerate's FP8 training needs a CUDA GPU (Hopper / Ada) and one of its FP8 backends."""
    import torch
    if cfg.cpu or not torch.cuda.is_available():
        raise UserError('mixed_precision=fp8 needs a CUDA GPU (Hopper or Ada); set mixed_precision=auto')
    from accelerate.utils import is_msamp_available, is_torchao_available, is_transformer_engine_available
    if not (is_transformer_engine_available() or is_torchao_available() or is_msamp_available()):
        raise UserError('mixed_precision=fp8 needs an FP8 backend of Accelerate: pip install torchao (or '
                        'transformer-engine, MS-AMP); or set mixed_precision=bf16')


SHAPES = ('fmnist', 'tiny_fmnist', 'tiny', 'small', 'base', 'base_384', 'native')  # the order messages list them in


def _choices(cfg) -> Dict[str, Optional[str]]:
    """Hydra's group choices of ``cfg`` (its ``hydra`` node, else the running Hydra job's), or {}."""
    try:
        if 'hydra' in cfg:
            return dict(cfg.hydra.runtime.choices)
        from hydra.core.hydra_config import HydraConfig
        return dict(HydraConfig.get().runtime.choices)
    except Exception:  # composed without Hydra's node, no Hydra job
        return {}


def _template(family: Optional[str]) -> Optional[str]:
    """The raw timm name of ``model=<family>`` (``gka_deit_${.arch}``), None for model=timm or an unknown family."""
    from omegaconf import OmegaConf
    path = os.path.join(CONF_DIR, 'model', f'{family}.yaml')
    if not family or not os.path.isfile(path):
        return None
    template = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get('name')
    return template if isinstance(template, str) and '${.arch}' in template else None


def _registered(name: str) -> bool:
    import importlib

    import timm
    importlib.import_module('vit_gka.models')  # registers the GKA, VLT and compact-kernel families
    return timm.is_model(name)


def families() -> List[str]:
    """The attention families, ``model=<family>`` with a ``shape=``: the options of conf/model/ that name their timm
    model by the shape's arch (all but ``model=timm``)."""
    return [family for family in options('model') if _template(family)]


def family_names(family: str) -> Dict[str, str]:
    """{shape: timm name} of the attention family ``model=<family>`` at every shape= whose name timm has."""
    from omegaconf import OmegaConf
    template = _template(family)
    names = {}
    shapes = sorted(options('shape'), key=lambda s: (SHAPES.index(s) if s in SHAPES else len(SHAPES), s))
    for shape in shapes if template else []:
        arch = OmegaConf.load(os.path.join(CONF_DIR, 'shape', f'{shape}.yaml')).get('arch')
        if arch and _registered(template.replace('${.arch}', arch)):
            names[shape] = template.replace('${.arch}', arch)
    return names


def check_model(cfg) -> str:
    """``UserError`` unless ``cfg.model.name`` is a model of timm's registry: ``model=timm`` without
    ``model.name``, an attention family at a shape it does not come in (``model=eka_fixed shape=base``),
    ``shape=native`` with a family, an unknown ``model.name``. Returns the name."""
    from omegaconf import OmegaConf
    model = cfg.model
    choices = _choices(cfg)
    family, shape = choices.get('model'), choices.get('shape')
    if OmegaConf.is_missing(model, 'name'):
        raise UserError('model=timm needs the timm model name: model.name=<name>, e.g. '
                        'model=timm model.name=vit_small_patch16_224')
    template, arch = _template(family), model.get('arch')
    if template and shape and arch is None:
        raise UserError(f"shape={shape} is for model=timm (a timm model as registered); model={family} comes in "
                        f"shape={', '.join(family_names(family))}")
    name = str(model.name)
    if _registered(name):
        return name
    if template and shape and name == template.replace('${.arch}', str(arch)):
        raise UserError(f"model={family} has no shape={shape} (timm has no {name}); model={family} comes in "
                        f"shape={', '.join(family_names(family))}")
    raise UserError(f"unknown timm model '{name}' (model.name); the attention families are "
                    f"model={', '.join(families())} with a shape=, any timm model: model=timm model.name=<name>")
