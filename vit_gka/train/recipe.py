"""The training recipe from timm's pieces: model, loss, mixup / cutmix, scaled lr, optimizer, schedule, EMA.

Each function reads its part of the composed Hydra config (``model``, ``aug``, ``optim``, ``sched``, ``ema``
and the top-level keys) and returns what job.py runs with.
"""
import math
import pkgutil
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf

from timm.models.vision_transformer import ATTN_LAYERS  # names a timm ViT's attn_layer takes (vit_gka adds its own)

from vit_gka import models as registered  # importing the package registers its models with timm
from vit_gka.data.datasets import data_preprocessing
from vit_gka.errors import UserError
from vit_gka.train.choices import check_choice

__all__ = ['model_args', 'vit_gka_models', 'create_model', 'record_preprocessing', 'create_loss', 'create_mixup',
           'scaled_lr', 'create_optimizer', 'create_scheduler', 'create_ema']


def model_args(cfg: DictConfig, num_classes: int) -> Dict[str, Any]:
    """``timm.create_model`` keywords: ``model.args`` plus the classes, input channels and drop path rate."""
    args = OmegaConf.to_container(cfg.model.args, resolve=True) if cfg.model.args is not None else {}
    args['num_classes'] = num_classes
    if 'in_chans' not in args and cfg.data.in_chans is not None:
        args['in_chans'] = int(cfg.data.in_chans)
    if cfg.drop_path is not None:
        args['drop_path_rate'] = float(cfg.drop_path)
    return args


def vit_gka_models() -> List[str]:
    """Every model vit_gka registers in timm: each module of ``vit_gka.models`` is one family."""
    import timm
    return [name for module in pkgutil.iter_modules(registered.__path__) if not module.name.startswith('_')
            for name in timm.list_models(module=module.name)]


def create_model(name: str, args: Dict[str, Any], data_cfg):
    """The timm model ``name``, with the data set's preprocessing recorded in its pretrained config."""
    import timm
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}' (model.name); give a timm model or one of vit_gka's: "
                        f"{', '.join(vit_gka_models())}")
    layer = args.get('attn_layer')  # model.args.attn_layer=gka: GKA in any timm VisionTransformer (vit_*, deit3_*)
    if isinstance(layer, str) and layer not in ATTN_LAYERS:
        names = ', '.join(sorted(k for k in ATTN_LAYERS if k))
        raise UserError(f"model.args.attn_layer={layer} is not one of timm's {names}")
    try:
        model = timm.create_model(name, **args)
    except (TypeError, ValueError) as e:
        raise UserError(f'cannot build {name} with model.args {args}: {e}; fix model.args') from e
    record_preprocessing(model, data_cfg)
    return model


def record_preprocessing(model, data_cfg) -> None:
    """What the data set prescribes (mean / std / crop / interpolation), the model's actual input size and its
    classes, in its pretrained config: ``resolve_data_config``, the exported model folder and eval.py then use what
    training used. Training records them on the model it builds, eval.py on a model it loads from weights."""
    cfg = dict(model.pretrained_cfg)
    cfg.update(data_preprocessing(data_cfg))
    embed = getattr(model, 'patch_embed', None)
    if embed is not None:
        cfg['input_size'] = (embed.proj.in_channels, *embed.img_size)
    in_chans = cfg['input_size'][0]
    for key in ('mean', 'std'):
        if len(cfg[key]) != in_chans:  # one channel's statistics for three (or the reverse): their mean for each
            cfg[key] = tuple([sum(cfg[key]) / len(cfg[key])] * in_chans)
    cfg['num_classes'] = model.num_classes
    model.pretrained_cfg = cfg


def create_loss(cfg: DictConfig, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    smoothing = float(cfg.aug.smoothing or 0.0)
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup / cutmix make soft targets (with smoothing folded in)
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


def create_mixup(cfg: DictConfig, num_classes: int):
    """timm's ``Mixup`` for the ``aug`` node, or None when neither mixup nor cutmix is on."""
    from timm.data import Mixup
    aug = cfg.aug
    mixup, cutmix = float(aug.mixup or 0.0), float(aug.cutmix or 0.0)
    cutmix_minmax = aug.cutmix_minmax
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                 cutmix_minmax=list(cutmix_minmax) if cutmix_minmax is not None else None,
                 prob=float(aug.mixup_prob), switch_prob=float(aug.mixup_switch_prob),
                 mode=str(aug.mixup_mode), label_smoothing=float(aug.smoothing or 0.0),
                 num_classes=num_classes)


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """lr = base lr x global batch / lr_base_size ('linear', DeiT), or its square root ('sqrt'), or as given."""
    rule = check_choice('lr_scale', 'none' if str(cfg.lr_scale) == 'None' else str(cfg.lr_scale))  # null: none
    ratio = global_batch / float(cfg.lr_base_size)
    if rule == 'linear':
        return float(cfg.lr) * ratio
    if rule == 'sqrt':
        return float(cfg.lr) * math.sqrt(ratio)
    return float(cfg.lr)


FUSED_OPTIMIZERS = ('adam', 'adamw')  # timm names of torch's optimizers with a fused step on CPU and GPU


def create_optimizer(model, opt_cfg: DictConfig, lr: float):
    """timm's ``create_optimizer_v2`` for the ``optim`` node (betas / eps / momentum only where given; torch's
    fused step for Adam / AdamW when ``fused``)."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(
        model, opt=str(opt_cfg.opt), lr=lr, weight_decay=float(opt_cfg.weight_decay),
        **({'betas': tuple(opt_cfg.betas)} if opt_cfg.betas is not None else {}),
        **({'eps': float(opt_cfg.eps)} if opt_cfg.eps is not None else {}),
        **({'momentum': float(opt_cfg.momentum)} if opt_cfg.momentum is not None
           and str(opt_cfg.opt) in ('sgd', 'momentum', 'nesterov') else {}),
        **({'fused': True} if opt_cfg.get('fused') and str(opt_cfg.opt) in FUSED_OPTIMIZERS else {}))


def create_scheduler(optimizer, cfg: DictConfig, updates_per_epoch: int):
    """timm's ``create_scheduler_v2`` for the ``sched`` node, stepped per update (``step_update``; with
    ``step_on_epochs=False`` its ``step(epoch)`` does nothing, so nothing calls it); returns (scheduler, epochs)."""
    from timm.scheduler import create_scheduler_v2
    sched_cfg = cfg.sched
    return create_scheduler_v2(
        optimizer, sched=str(sched_cfg.sched), num_epochs=int(cfg.epochs),
        warmup_epochs=sched_cfg.warmup_epochs, warmup_lr=float(sched_cfg.warmup_lr),
        min_lr=float(sched_cfg.min_lr), cooldown_epochs=int(sched_cfg.cooldown_epochs),
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)


def create_ema(model, ema_cfg: DictConfig):
    """timm's ``ModelEmaV3`` of ``model`` when ``ema.enable``, else None."""
    from timm.utils import ModelEmaV3
    if not ema_cfg.enable:
        return None
    return ModelEmaV3(model, decay=float(ema_cfg.decay), use_warmup=bool(ema_cfg.warmup))
