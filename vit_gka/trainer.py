"""One training job, from a composed Hydra config to a finished run folder (what ``train.py`` runs).

Run folder (Hydra's run dir; every process uses the main process's)::

    .hydra/                  Hydra's own record of the job
    config.yaml              the resolved configuration
    tb/                      TensorBoard events
    checkpoints/last/        model.safetensors, model_ema.safetensors, state.pt (see checkpoint.py); at epoch
                             ends and, with checkpoint_every_steps=n, every n updates (exact mid-epoch resume)
    steps.jsonl              loss and lr of every optimizer update (faults.py)
    best.safetensors         the best weights by test top-1 (raw or EMA, results.json says which)
    model/                   timm save_for_hf folder of the final weights: timm.create_model('local-dir:...')
    results.json             the numbers (see ``RESULT_KEYS``)

Only the main process writes. Distributed runs (``accelerate launch`` / ``torchrun``) shard the training
set (timm's RepeatAugSampler with repeated augmentation, else DistributedSampler) and the test set.
"""
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .cli import UserError
from .data import (create_dataset, create_eval_loader, create_train_loader, data_preprocessing, set_loader_epoch,
                   unreadable_images)
from .engine import evaluate, sigma_stats, train_one_epoch
from .faults import NonFiniteError, StepLog
from .validation import validate  # noqa: F401  (trainer.validate, as before)
from .kernels import AttentionSparsity, model_sparsity

log = logging.getLogger('vit_gka.train')

RESULT_KEYS = ('model', 'model_args', 'data', 'num_classes', 'img_size', 'epochs', 'seed', 'global_batch_size',
               'params', 'params_attn', 'params_mlp', 'gmacs', 'gflops', 'top1', 'top5', 'ema_top1', 'ema_top5',
               'loss', 'train_images_per_s', 'wall_time_s', 'sigma_init', 'sparsity')

# Attention sparsity (fraction of exact zeros of the attention weights, per layer) is measured on the first
# SPARSITY_IMAGES test images, one extra forward per evaluation (models with kernel attention only).
SPARSITY_IMAGES = 64


def _mixed_precision(value: str) -> str:
    if value in (None, 'auto'):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return 'bf16'
        return 'no'
    return str(value)


def _no_accelerator_device() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    xpu = getattr(torch, 'xpu', None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def _make_accelerator(cfg: DictConfig):
    """Accelerate's state for this job. On a machine without GPU ``cpu=True`` is what makes Accelerate use
    several CPU processes (gloo) under torchrun / ``accelerate launch --multi_gpu``."""
    from accelerate import Accelerator
    return Accelerator(
        cpu=bool(cfg.get('cpu', False)) or _no_accelerator_device(),
        mixed_precision=_mixed_precision(cfg.get('mixed_precision', 'auto')),
        gradient_accumulation_steps=int(cfg.grad_accum),
    )


def _shared_run_dir(accelerator) -> str:
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


def _model_args(cfg: DictConfig, num_classes: int) -> Dict[str, Any]:
    args = OmegaConf.to_container(cfg.model.get('args') or {}, resolve=True)
    args['num_classes'] = num_classes
    if 'in_chans' not in args and cfg.data.get('in_chans') is not None:
        args['in_chans'] = int(cfg.data.in_chans)
    if cfg.get('drop_path') is not None:
        args['drop_path_rate'] = float(cfg.drop_path)
    return args


def _create_model(name: str, args: Dict[str, Any], data_cfg):
    import timm
    import vit_gka  # noqa: F401  (registers the GKA / VLT models)
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}' (model.name); GKA models: "
                        f"{', '.join(timm.list_models('gka_deit_*') + timm.list_models('vlt_deit_*'))}")
    try:
        model = timm.create_model(name, **args)
    except (TypeError, ValueError) as e:
        raise UserError(f'cannot build {name} with model.args {args}: {e}; fix model.args') from e
    # What the data set prescribes (mean / std / crop / interpolation), the actual input size and classes:
    # recorded in the pretrained config so that resolve_data_config and the exported model folder agree.
    in_chans = model.patch_embed.proj.in_channels if hasattr(model, 'patch_embed') else args.get('in_chans', 3)
    img_size = tuple(model.patch_embed.img_size) if hasattr(model, 'patch_embed') else None
    cfg = dict(model.pretrained_cfg)
    cfg.update(data_preprocessing(data_cfg))
    if img_size is not None:
        cfg['input_size'] = (in_chans, *img_size)
    for key in ('mean', 'std'):
        if len(cfg[key]) != in_chans:
            cfg[key] = tuple([sum(cfg[key]) / len(cfg[key])] * in_chans)
    cfg['num_classes'] = model.num_classes
    model.pretrained_cfg = cfg
    return model


def _loss_fns(cfg: DictConfig, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    smoothing = float(cfg.aug.get('smoothing', 0.0) or 0.0)
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup / cutmix make soft targets (with smoothing folded in)
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


def _mixup(cfg: DictConfig, num_classes: int):
    from timm.data import Mixup
    aug = cfg.aug
    mixup, cutmix = float(aug.get('mixup', 0.0) or 0.0), float(aug.get('cutmix', 0.0) or 0.0)
    cutmix_minmax = aug.get('cutmix_minmax')
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                 cutmix_minmax=list(cutmix_minmax) if cutmix_minmax is not None else None,
                 prob=float(aug.get('mixup_prob', 1.0)), switch_prob=float(aug.get('mixup_switch_prob', 0.5)),
                 mode=str(aug.get('mixup_mode', 'batch')), label_smoothing=float(aug.get('smoothing', 0.0) or 0.0),
                 num_classes=num_classes)


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """lr = base lr x global batch / lr_base_size ('linear', DeiT), or its square root ('sqrt'), or as given."""
    rule = str(cfg.get('lr_scale', 'linear'))
    ratio = global_batch / float(cfg.get('lr_base_size', 512))
    if rule == 'linear':
        return float(cfg.lr) * ratio
    if rule == 'sqrt':
        return float(cfg.lr) * math.sqrt(ratio)
    if rule in ('none', 'None'):
        return float(cfg.lr)
    raise UserError(f"lr_scale must be linear, sqrt or none, not '{rule}'")


def _img_size(model) -> Any:
    size = tuple(model.pretrained_cfg['input_size'][1:])
    return size[0] if size[0] == size[1] else list(size)


def _sigma_init(model) -> Optional[float]:
    for module in model.modules():
        if hasattr(module, 'log_sigma') and hasattr(module, 'sigma_init'):
            return float(module.sigma_init)
    return None


def _sparsity_batch(model, dataset, device) -> Optional[torch.Tensor]:
    """The fixed batch that attention sparsity is measured on, or None for a model without kernel attention."""
    if not AttentionSparsity(model).layers or len(dataset) == 0:
        return None
    return torch.stack([dataset[i][0] for i in range(min(SPARSITY_IMAGES, len(dataset)))]).to(device)


def _model_stats(model) -> Dict[str, Any]:
    try:
        from .flops import model_stats
    except ModuleNotFoundError as e:
        if e.name != 'vit_gka.flops':
            raise
        log.warning('vit_gka.flops is missing: no parameter breakdown or GMACs in results.json')
        total = sum(p.numel() for p in model.parameters())
        return {'params': total, 'params_attn': None, 'params_mlp': None, 'params_other': None,
                'gmacs': None, 'gflops': None, 'size_mb': None}
    was_training = model.training
    model.eval()
    try:
        return model_stats(model)
    finally:
        model.train(was_training)


def run_training(cfg: DictConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns results.json's content (on every process)."""
    from accelerate.utils import set_seed
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    wall_start = time.time()
    validate(cfg)
    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)
    run_dir = _shared_run_dir(accelerator)

    chk = ckpt.load_checkpoint(cfg.resume) if cfg.get('resume') else None
    _, num_classes = create_dataset(cfg.data, 'train') if cfg.data.get('num_classes') is None else (
        None, int(cfg.data.num_classes))

    set_seed(int(cfg.seed))  # the same initial weights on every process
    model_name = str(cfg.model.name)
    model_args = _model_args(cfg, num_classes)
    model = _create_model(model_name, model_args, cfg.data)
    data_config = resolve_data_config({}, model=model)

    world = accelerator.num_processes
    global_batch = int(cfg.batch_size) * world * int(cfg.grad_accum)
    lr = scaled_lr(cfg, global_batch)

    mixup_fn = _mixup(cfg, num_classes)
    train_loader, _ = create_train_loader(
        cfg.data, data_config, int(cfg.batch_size), aug_cfg=cfg.aug, num_workers=int(cfg.workers),
        subset=cfg.get('train_subset'), drop_last=mixup_fn is not None, num_replicas=world,
        rank=accelerator.process_index, repeated_aug=int(cfg.get('repeated_aug', 0) or 0), seed=int(cfg.seed))
    eval_loader, _ = create_eval_loader(cfg.data, data_config, int(cfg.get('eval_batch_size') or 2 * cfg.batch_size),
                                        num_workers=int(cfg.workers))
    sparsity_images = _sparsity_batch(model, eval_loader.dataset, accelerator.device) if main else None
    if len(train_loader) == 0:
        raise UserError(f'no training batches: {len(train_loader.dataset)} samples, batch_size={cfg.batch_size}')

    opt_cfg = cfg.optim
    optimizer = create_optimizer_v2(
        model, opt=str(opt_cfg.opt), lr=lr, weight_decay=float(opt_cfg.weight_decay),
        **({'betas': tuple(opt_cfg.betas)} if opt_cfg.get('betas') is not None else {}),
        **({'eps': float(opt_cfg.eps)} if opt_cfg.get('eps') is not None else {}),
        **({'momentum': float(opt_cfg.momentum)} if opt_cfg.get('momentum') is not None
           and str(opt_cfg.opt) in ('sgd', 'momentum', 'nesterov') else {}))
    updates_per_epoch = math.ceil(len(train_loader) / int(cfg.grad_accum))
    sched_cfg = cfg.sched
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=str(sched_cfg.sched), num_epochs=int(cfg.epochs),
        warmup_epochs=sched_cfg.warmup_epochs, warmup_lr=float(sched_cfg.warmup_lr),
        min_lr=float(sched_cfg.min_lr), cooldown_epochs=int(sched_cfg.get('cooldown_epochs', 0)),
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)

    compile_opt = cfg.get('compile', 'auto')
    if compile_opt is True or str(compile_opt).lower() == 'true' or (
            compile_opt == 'auto' and accelerator.device.type == 'cuda'):
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if world > 1:
        eval_loader = accelerator.prepare(eval_loader)
    raw_model = accelerator.unwrap_model(model)

    model_ema = None
    if cfg.ema.enable:
        model_ema = ModelEmaV3(raw_model, decay=float(cfg.ema.decay), use_warmup=bool(cfg.ema.get('warmup', False)))

    state = ckpt.restore_training(chk, dict(model_name=model_name, model_args=model_args, epochs=num_epochs,
                                            global_batch_size=global_batch),
                                  raw_model, model_ema, optimizer, lr_scheduler, accelerator)
    if chk is None:
        set_seed(int(cfg.seed) + accelerator.process_index)  # drop path etc. differ per process
    start_epoch, start_step, totals, num_updates = state['epoch'], state['step'], state['totals'], state['num_updates']
    best, history, nonfinite_skipped = state['best'], state['history'], state['nonfinite_skipped']
    prev_wall, prev_train_time, prev_images = state['wall_time_s'], state['train_time_s'], state['train_images']

    # Nothing is written before this point: every check of the input has passed.
    tb = None
    step_log = StepLog(run_dir, enabled=main and bool(cfg.get('step_log', True)))
    if main:
        os.makedirs(run_dir, exist_ok=True)
        ckpt.write_text(os.path.join(run_dir, 'config.yaml'), OmegaConf.to_yaml(cfg, resolve=True))
        step_log.carry_over(ckpt.run_dir_of(chk.folder) if chk is not None else None, num_updates)
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(run_dir, 'tb'))

    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info('%s %s: %.2f M parameters, data %s (%d train / %d test images, %d classes), input %s',
             cfg.get('model_choice', model_name), model_name, n_params / 1e6, cfg.data.name,
             len(train_loader.dataset), len(eval_loader.dataset), num_classes, tuple(data_config['input_size']))
    log.info('global batch %d = %d per process x %d processes x %d accumulation; lr %.3g (base %.3g, %s '
             'scaling per %d); %d epochs x %d updates; device %s, mixed precision %s; run dir %s',
             global_batch, int(cfg.batch_size), world, int(cfg.grad_accum), lr, float(cfg.lr),
             cfg.get('lr_scale', 'linear'), int(cfg.get('lr_base_size', 512)), num_epochs, updates_per_epoch,
             accelerator.device, accelerator.mixed_precision, run_dir)

    loss_fn = _loss_fns(cfg, mixup_fn is not None)
    stop_epoch = min(int(cfg.stop_epoch), num_epochs) if cfg.get('stop_epoch') is not None else num_epochs
    eval_interval = int(cfg.get('eval_interval', 1) or 0)
    metrics = ema_metrics = None
    train_time, train_images = prev_train_time, prev_images
    last_dir = os.path.join(run_dir, 'checkpoints', 'last')
    every = cfg.get('checkpoint_every_steps')
    saved_at = [None]  # the update of the last checkpoint written

    def save(epoch: int, step: int, updates: int, partial: Optional[Dict[str, Any]] = None) -> None:
        """The checkpoint to continue at (epoch, step); a collective (every process's RNGs and partial sums)."""
        procs = ckpt.gather_process_states(accelerator, {'totals': partial})
        if main:
            state = {
                'epoch': epoch, 'step': step, 'num_updates': updates,
                'optimizer': optimizer.state_dict(), 'scheduler': lr_scheduler.state_dict(),
                'ema': {'decay': float(cfg.ema.decay), 'warmup': bool(cfg.ema.get('warmup', False)),
                        'num_updates': updates} if model_ema is not None else None,
                'rng': [p['rng'] for p in procs], 'procs': procs, 'best': best, 'history': history,
                'model_name': model_name, 'model_args': model_args, 'seed': int(cfg.seed),
                'global_batch_size': global_batch, 'epochs': num_epochs,
                'wall_time_s': prev_wall + time.time() - wall_start, 'train_time_s': train_time,
                'train_images': train_images, 'nonfinite_skipped': nonfinite_skipped,
            }
            ckpt.save_checkpoint(last_dir, raw_model.state_dict(), state,
                                 model_ema.module.state_dict() if model_ema is not None else None)
        saved_at[0] = updates

    def on_update(info: Dict[str, Any]) -> None:
        step_log.write({'epoch': info['epoch'] + 1, **{k: info[k] for k in ('step', 'update', 'loss', 'lr',
                                                                             'skipped')}})
        if every and info['update'] % int(every) == 0 and info['step'] < len(train_loader):
            save(info['epoch'], info['step'], info['update'], info['totals'])

    bad_images = unreadable_images(train_loader.dataset)
    for epoch in range(start_epoch, stop_epoch):
        set_loader_epoch(train_loader, epoch, accelerator.process_index)
        loader = train_loader
        if start_step:  # resumed mid-epoch: the same order, the first start_step batches not loaded
            from accelerate import skip_first_batches
            loader = skip_first_batches(train_loader, start_step)
        try:
            stats = train_one_epoch(
                model, loader, optimizer, loss_fn, accelerator, epoch, lr_scheduler=lr_scheduler,
                num_updates=num_updates, mixup_fn=mixup_fn, model_ema=model_ema, clip_grad=cfg.get('clip_grad'),
                tb_writer=tb, log_interval=int(cfg.get('log_interval', 50)),
                progress=bool(cfg.get('progress', True)), desc=f'epoch {epoch + 1}/{num_epochs}',
                start_step=start_step, totals=totals, nonfinite=str(cfg.get('nonfinite', 'stop')),
                on_update=on_update)
        except NonFiniteError as e:
            raise e.with_checkpoint(f'{last_dir} (update {saved_at[0]})' if saved_at[0] is not None else
                                    chk.folder if chk is not None else None) from None
        finally:
            step_log.close()
        nonfinite_skipped += stats['skipped']  # the epoch's, including those before a mid-epoch resume
        start_step, totals = 0, None
        num_updates = stats['num_updates']
        lr_scheduler.step(epoch + 1)
        train_time += stats['time_s']
        train_images += stats['images']
        if unreadable_images(train_loader.dataset) > bad_images:
            bad_images = unreadable_images(train_loader.dataset)
            log.warning('%d unreadable training images skipped so far (the warnings name them)', bad_images)
        last = epoch + 1 == stop_epoch
        do_eval = last or (eval_interval > 0 and (epoch + 1) % eval_interval == 0)
        line = (f"epoch {epoch + 1}/{num_epochs}  train loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
                f"{stats['images_per_s']:.0f} img/s  {stats['time_s']:.0f} s")
        record = {'epoch': epoch + 1, 'train_loss': stats['loss'], 'lr': stats['lr'],
                  'train_images_per_s': stats['images_per_s']}
        if do_eval:
            metrics = evaluate(model, eval_loader, accelerator)
            line += (f"  |  test top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
                     f"loss {metrics['loss']:.4f}")
            record.update(top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
            if model_ema is not None:
                ema_metrics = evaluate(model_ema.module, eval_loader, accelerator)
                line += f"  |  EMA top-1 {ema_metrics['top1']:.2f}"
                record.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
        sparsity = None
        if do_eval and sparsity_images is not None:
            sparsity = model_sparsity(raw_model, sparsity_images, accelerator.autocast)
            line += f"  |  sparsity {sparsity['mean']:.3f}"
            record['sparsity'] = sparsity['mean']
        history.append(record)
        if main:
            tb.add_scalar('train/epoch_loss', stats['loss'], epoch + 1)
            tb.add_scalar('train/images_per_s', stats['images_per_s'], epoch + 1)
            for layer, s in sigma_stats(raw_model).items():
                for k, v in s.items():
                    tb.add_scalar(f'sigma/layer{layer:02d}/{k}', v, epoch + 1)
            if do_eval:
                tb.add_scalar('eval/loss', metrics['loss'], epoch + 1)
                tb.add_scalar('eval/top1', metrics['top1'], epoch + 1)
                tb.add_scalar('eval/top5', metrics['top5'], epoch + 1)
                tb.add_scalar('eval/images_per_s', metrics['images_per_s'], epoch + 1)
                if ema_metrics is not None:
                    tb.add_scalar('eval/ema_top1', ema_metrics['top1'], epoch + 1)
                    tb.add_scalar('eval/ema_top5', ema_metrics['top5'], epoch + 1)
            if sparsity is not None:
                for i, value in enumerate(sparsity['layers']):
                    tb.add_scalar(f'sparsity/layer_{i:02d}', value, epoch + 1)
                tb.add_scalar('sparsity/mean', sparsity['mean'], epoch + 1)
            tb.flush()
        if do_eval:
            candidates = [(metrics['top1'], False)]
            if ema_metrics is not None:
                candidates.append((ema_metrics['top1'], True))
            top1, is_ema = max(candidates, key=lambda c: c[0])
            if top1 > best['top1']:
                best = {'top1': top1, 'epoch': epoch + 1, 'ema': is_ema}
                if main:
                    weights = (model_ema.module if is_ema else raw_model).state_dict()
                    ckpt.save_weights(weights, os.path.join(run_dir, 'best.safetensors'))
        save(epoch + 1, 0, num_updates)
        log.info(line)
        accelerator.wait_for_everyone()

    if metrics is None:  # resumed at (or past) the last epoch: evaluate what was loaded
        metrics = evaluate(model, eval_loader, accelerator)
        if model_ema is not None:
            ema_metrics = evaluate(model_ema.module, eval_loader, accelerator)

    results = None
    if main:
        results = _write_results(cfg, run_dir, raw_model, model_ema, model_name, model_args, num_classes,
                                 num_epochs, global_batch, metrics, ema_metrics, best, history,
                                 train_images / max(train_time, 1e-9), prev_wall + time.time() - wall_start,
                                 stop_epoch, sparsity_images, accelerator.autocast,
                                 faults={'nonfinite_skipped': nonfinite_skipped, 'unreadable_images': bad_images})
        tb.close()
        print(f"{cfg.get('model_choice', model_name)}: test top-1 {results['top1']:.2f}%"
              + (f" (EMA {results['ema_top1']:.2f}%)" if results['ema_top1'] is not None else '')
              + f", params {results['params'] / 1e6:.3f} M"
              + (f", GMACs {results['gmacs']:.4f}" if results['gmacs'] is not None else '')
              + f", train {results['train_images_per_s']:.0f} img/s, {results['wall_time_s']:.0f} s"
              + f" -> {run_dir}", flush=True)
    accelerator.wait_for_everyone()
    return results


def _write_results(cfg, run_dir, raw_model, model_ema, model_name, model_args, num_classes, num_epochs,
                   global_batch, metrics, ema_metrics, best, history, train_rate, wall_time, stop_epoch,
                   sparsity_images=None, autocast=None, faults=None):
    use_ema = ema_metrics is not None and ema_metrics['top1'] > metrics['top1']
    final = model_ema.module if use_ema else raw_model
    if cfg.get('save_model', True):
        ckpt.save_model_folder(final, os.path.join(run_dir, 'model'))
    stats = _model_stats(raw_model)
    results = {
        'model': model_name,
        'model_config': cfg.get('model_choice'),
        'model_args': model_args,
        'data': str(cfg.data.name),
        'num_classes': num_classes,
        'img_size': _img_size(raw_model),
        'epochs': num_epochs,
        'epochs_done': stop_epoch,
        'seed': int(cfg.seed),
        'global_batch_size': global_batch,
        'train_subset': cfg.get('train_subset'),
        'params': stats['params'],
        'params_attn': stats.get('params_attn'),
        'params_mlp': stats.get('params_mlp'),
        'params_other': stats.get('params_other'),
        'gmacs': stats.get('gmacs'),
        'gflops': stats.get('gflops'),
        'size_mb': stats.get('size_mb'),
        'top1': metrics['top1'],
        'top5': metrics['top5'],
        'loss': metrics['loss'],
        'ema_top1': ema_metrics['top1'] if ema_metrics is not None else None,
        'ema_top5': ema_metrics['top5'] if ema_metrics is not None else None,
        'best_top1': best['top1'] if best['epoch'] is not None else None,
        'best_epoch': best['epoch'],
        'best_is_ema': best['ema'],
        'model_folder_weights': 'ema' if use_ema else 'model',
        'eval_images_per_s': metrics['images_per_s'],
        'train_images_per_s': train_rate,
        'wall_time_s': wall_time,
        'sigma_init': _sigma_init(raw_model),
        'sigma': {str(k): v for k, v in sigma_stats(final).items()},
        # of the model/ weights on the first SPARSITY_IMAGES test images; None without kernel attention
        'sparsity': model_sparsity(final, sparsity_images, autocast) if sparsity_images is not None else None,
        **(faults or {}),  # nonfinite_skipped, unreadable_images (faults.py, data.py)
        'history': history,
    }
    ckpt.write_text(os.path.join(run_dir, 'results.json'), json.dumps(results, indent=2) + '\n')
    return results
