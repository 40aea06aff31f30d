"""One training job, from a composed Hydra config to a finished run folder (what ``train.py`` runs).

``run_training`` reads top to bottom as the recipe, as DeiT's ``main()`` does: config -> data set -> model ->
loaders -> optimizer, schedule, loss, mixup, EMA -> resume -> epochs -> results. What it calls:

* recipe.py: timm's model, loss, mixup / cutmix, scaled lr, optimizer, schedule and EMA from the config;
* vit_gka.data: the data sets, transforms and loaders, and the seeded order that makes resume exact;
* loop.py: one epoch of updates (with the non-finite guard) and the evaluation;
* state.py: the run's parts (``TrainParts``) and its checkpointed state (``TrainState``): save, load, resume;
* results.py: what the run folder records (config.yaml, steps.jsonl, tb/, best.safetensors, model/,
  results.json);
* distributed.py: Accelerate, the run folder every process shares (and its lock: one writer per folder);
* preemption.py: SIGTERM / SIGUSR2 / SIGUSR1 stop the run at the next update with a checkpoint (exit 75).

Run folder (Hydra's run dir; every process uses the main process's; only the main process writes)::

    .hydra/                  Hydra's own record of the job
    run.lock                 while the run writes the folder: the pid and host of its main process
    config.yaml              the resolved configuration
    tb/                      TensorBoard events
    checkpoints/last/        model.safetensors, model_ema.safetensors, state.pt (state.py); at epoch ends and,
                             with checkpoint_every_steps=n, every n updates (exact mid-epoch resume)
    steps.jsonl              loss and lr of every optimizer update
    best.safetensors         the best weights by test top-1 (raw or EMA, results.json says which)
    model/                   timm save_for_hf folder of the final weights: timm.create_model('local-dir:...')
    results.json             the numbers (results.py)

Distributed runs (``accelerate launch`` / ``torchrun``) shard the training set (timm's RepeatAugSampler with
repeated augmentation, else DistributedSampler) and the test set.
"""
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig

from vit_gka.data.batched import InMemoryImages
from vit_gka.data.datasets import class_names, create_dataset, unreadable_images
from vit_gka.data.loaders import create_eval_loader, create_train_loader
from vit_gka.data.sampling import set_loader_epoch
from vit_gka.data.streaming import StreamingImages
from vit_gka.errors import NonFiniteError, UserError
from vit_gka.analysis.attention import AttentionSparsity, model_sparsity
from vit_gka.train import recipe
from vit_gka.train.checkpoint_history import keep_epoch_checkpoint
from vit_gka.train.distributed import from_main_process, lock_run_dir, make_accelerator, shared_run_dir
from vit_gka.train.finetune import apply_finetune
from vit_gka.train.guards import check_class_maps, check_patch_grid, refuse_finished
from vit_gka.train.loop import evaluate, train_one_epoch
from vit_gka.train.preemption import StopSignals, Stopped, shield_workers
from vit_gka.train.results import RunRecords, summary_line
from vit_gka.train.state import TrainParts, TrainState, resume, resume_checkpoint, run_dir_of, save_checkpoint
from vit_gka.train.validation import validate

log = logging.getLogger('vit_gka.train')

__all__ = ['run_training', 'build_parts', 'RunSetup', 'SPARSITY_IMAGES']

# Attention sparsity (fraction of exact zeros of the attention weights, per layer) is measured on the first
# SPARSITY_IMAGES test images, one extra forward per evaluation (models with kernel attention only).
SPARSITY_IMAGES = 64


def run_training(cfg: DictConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns results.json's content on every process (the main process
    writes it, the others receive it). Every input is checked before anything is written."""
    from accelerate import skip_first_batches
    from accelerate.utils import set_seed

    # Config, processes, run folder, and the checkpoint to resume from (a bad one stops before anything is built).
    started = time.time()
    validate(cfg)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)
    run_dir = shared_run_dir(accelerator)
    chk = resume_checkpoint(cfg.resume, run_dir)  # resume=auto: this run folder's own checkpoint, if any

    parts, setup = build_parts(cfg, accelerator, finetune=chk is None)  # a resumed run has its own weights
    model_name, model_args, num_classes = setup.model_name, setup.model_args, setup.num_classes
    dataset_train, data_config, train_loader = setup.dataset_train, setup.data_config, parts.train_loader
    raw_model, num_epochs, global_batch = parts.raw_model, setup.num_epochs, setup.global_batch
    sparsity_images = _sparsity_batch(raw_model, parts.eval_loader.dataset, accelerator.device) if main else None

    # Resume (every check before anything is loaded), or start: drop path etc. then differ per process.
    state = TrainState(model_name, model_args, epochs=num_epochs, global_batch_size=global_batch,
                       seed=int(cfg.seed), data=str(cfg.data.name), train_subset=cfg.train_subset, started=started)
    if chk is not None:
        state = resume(chk, state, parts)
    else:
        set_seed(int(cfg.seed) + accelerator.process_index)
    stop_epoch = min(int(cfg.stop_epoch), num_epochs) if cfg.stop_epoch is not None else num_epochs
    eval_interval = int(cfg.eval_interval or 0)

    # Every input has been checked: take the run folder (one writer per folder), start writing.
    if chk is None:
        refuse_finished(run_dir)
    lock = lock_run_dir(accelerator, run_dir)
    records = RunRecords(cfg, run_dir, enabled=main, accelerator=accelerator)
    records.open(run_dir_of(chk.folder) if chk is not None else None, state.num_updates)
    if chk is not None and not state.step and state.best['epoch'] == state.epoch and \
            not os.path.exists(os.path.join(run_dir, 'best.safetensors')):  # lost to a failed write after the checkpoint
        records.best((parts.model_ema.module if state.best['ema'] else raw_model).state_dict(), state.num_updates)
    log.info('%s %s: %.2f M parameters, data %s (%d train / %d test images, %d classes, transformed per %s, %d '
             'loader workers per '
             'process), input %s', cfg.model_choice, model_name, sum(p.numel() for p in raw_model.parameters()) / 1e6,
             cfg.data.name, len(train_loader.dataset), len(parts.eval_loader.dataset), num_classes,
             'batch' if isinstance(train_loader.dataset, InMemoryImages) else 'sample', train_loader.num_workers,
             tuple(data_config['input_size']))
    log.info('global batch %d = %d per process x %d processes x %d accumulation; lr %.3g (base %.3g, %s '
             'scaling per %d); %d epochs x %d updates; device %s, mixed precision %s; run dir %s',
             global_batch, int(cfg.batch_size), accelerator.num_processes, int(cfg.grad_accum), setup.lr, float(cfg.lr),
             cfg.lr_scale, int(cfg.lr_base_size), num_epochs, setup.updates_per_epoch, accelerator.device, accelerator.mixed_precision,
             run_dir)
    bad_images = unreadable_images(train_loader.dataset)

    # Epochs: train, then evaluate (every eval_interval epochs and after the last), log, keep the best, checkpoint.
    last_dir = os.path.join(run_dir, 'checkpoints', 'last')
    saved_at = None  # the update of the last checkpoint this job wrote

    def checkpoint() -> None:
        nonlocal saved_at
        if saved_at is not None:
            previous = saved_at
        else:  # resumed in place: what it resumed from
            previous = chk.state.num_updates if chk is not None and run_dir_of(chk.folder) == run_dir else None
        save_checkpoint(last_dir, state, parts, previous=f'update {previous}' if previous is not None else None)
        saved_at = state.num_updates

    def last_good() -> Optional[str]:  # the checkpoint a non-finite stop names: written by this job, or resumed
        return f'{last_dir} (update {saved_at})' if saved_at is not None else chk.folder if chk is not None else None

    def stopped(signal_name: str, where: str) -> None:  # preemption.py: after the checkpoint of that update
        records.close()
        message = (f'stopped by {signal_name} {where}: checkpoint {last_dir}; to continue, run the same command '
                   f'with {_continue_with(run_dir)}')
        log.info(message)
        raise Stopped(message, signal_name)

    def on_update(info: Dict[str, Any]) -> None:  # after every optimizer update
        records.step(info)
        every = cfg.checkpoint_every_steps
        mid_epoch = info['step'] < len(train_loader)  # at an epoch's end: after its evaluation and checkpoint
        if mid_epoch and (info['stop'] or every and info['update'] % int(every) == 0):
            if saved_at != state.num_updates:
                checkpoint()
        if mid_epoch and info['stop']:
            stopped(info['stop'], f"at epoch {info['epoch'] + 1}, step {info['step']} (update {info['update']})")

    metrics = ema_metrics = None
    with parts.stop:  # SIGTERM / SIGUSR2 / SIGUSR1: checkpoint at the next update boundary, then stop
        for epoch in range(state.epoch, stop_epoch):
            set_loader_epoch(train_loader, epoch, accelerator.process_index)
            # resumed mid-epoch: the same order, the first state.step batches not loaded
            loader = skip_first_batches(train_loader, state.step) if state.step else train_loader
            try:
                stats = train_one_epoch(parts, state, epoch, loader, on_update, records if main else None,
                                        desc=f'epoch {epoch + 1}/{num_epochs}')
            except NonFiniteError as e:
                raise e.with_checkpoint(last_good()) from None
            finally:
                records.close_steps()
            state.end_epoch(stats)
            bad = unreadable_images(train_loader.dataset)
            if bad > bad_images:
                bad_images = bad
                log.warning('%d unreadable training images skipped so far (the warnings name them)', bad)

            done = state.epoch
            evaluated = done == stop_epoch or (eval_interval > 0 and done % eval_interval == 0)
            sparsity = None
            if evaluated:
                metrics, ema_metrics = _test(parts)
                if sparsity_images is not None:
                    sparsity = model_sparsity(raw_model, sparsity_images, accelerator.autocast)
            record, line = _epoch_summary(done, num_epochs, stats, evaluated, metrics, ema_metrics, sparsity)
            state.history.append(record)
            records.epoch(done, state.num_updates, stats, raw_model, metrics if evaluated else None, ema_metrics,
                          sparsity)
            records.summary(state.history)
            best = _keep_best(state, parts, metrics, ema_metrics) if evaluated else None
            try:  # the checkpoint first: best.safetensors never gets ahead of it
                checkpoint()
                if main:  # checkpoint_keep=n: also this epoch's, the last n kept
                    keep_epoch_checkpoint(last_dir, done, int(cfg.checkpoint_keep))
                if best is not None:
                    records.best(best, state.num_updates)
            except NonFiniteError as e:
                raise e.with_checkpoint(last_good()) from None
            log.info(line)
            accelerator.wait_for_everyone()
            signal_name = parts.stop.agreed(accelerator)
            if signal_name and state.epoch < stop_epoch:
                stopped(signal_name, f'after epoch {state.epoch} (update {state.num_updates})')

    # Results: results.json, the model folder and the summary line (main process), on every process. A stop
    # signal now only waits for them: the run is done, and a half-written model/ would help nobody.
    with parts.stop:
        if metrics is None:  # resumed at (or past) the last epoch: evaluate what was loaded
            metrics, ema_metrics = _test(parts)
        labels = class_names(dataset_train)
        results = records.results(parts, state, metrics, ema_metrics, sparsity_images, bad_images,
                                  labels if labels is not None and len(labels) == num_classes else None)
        records.close()
    if parts.stop.received:
        log.info('%s came after the last epoch\'s checkpoint: the run finished first',
                 ', '.join(signal.Signals(s).name for s in parts.stop.received))
    if lock is not None:
        lock.release()
    if main:
        print(summary_line(results, cfg.model_choice, run_dir), flush=True)
    accelerator.wait_for_everyone()
    results = from_main_process(accelerator, results)
    # Nobody leaves while another process still receives (a gloo peer that exits mid-broadcast aborts the other:
    # "terminate called without an active exception"); then every process takes the process group down.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


class RunSetup(NamedTuple):
    """What ``build_parts`` decided besides the parts themselves."""
    dataset_train: Any
    num_classes: int
    model_name: str
    model_args: Dict[str, Any]
    data_config: Dict[str, Any]
    global_batch: int
    lr: float
    num_epochs: int
    updates_per_epoch: int


def build_parts(cfg: DictConfig, accelerator, finetune: bool = True) -> Tuple[TrainParts, RunSetup]:
    """The run's live parts from its config: data set, model, loaders, optimizer, schedule, loss, mixup,
    compilation, Accelerate's wrapping and the EMA (also what ``benchmarks/training.py`` times). ``finetune``:
    apply ``cfg.finetune`` (a resumed run loads its own weights instead)."""
    from accelerate.utils import set_seed
    from timm.data import resolve_data_config

    # Data set: the training set, read once (without a transform: the model's data config gives it).
    dataset_train, num_classes = create_dataset(cfg.data, 'train')

    # Model: the same initial weights on every process.
    set_seed(int(cfg.seed))
    model_name, model_args = str(cfg.model.name), recipe.model_args(cfg, num_classes)
    model = recipe.create_model(model_name, model_args, cfg.data)
    check_patch_grid(model, model_name)
    if cfg.finetune and finetune:  # finetune=: trained weights to start from
        log.info(apply_finetune(model, str(cfg.finetune)))
    data_config = resolve_data_config({}, model=model)

    # Loaders: every process reads its shard of one seeded order; the test set (sharded too, see below).
    world, batch_size = accelerator.num_processes, int(cfg.batch_size)
    global_batch = batch_size * world * int(cfg.grad_accum)
    mixup_fn = recipe.create_mixup(cfg, num_classes)
    loading = dict(num_workers=cfg.workers, batch_augment=cfg.batch_augment, on_cpu=accelerator.device.type == 'cpu',
                   local_processes=int(os.environ.get('LOCAL_WORLD_SIZE', 1)))  # set by torchrun / accelerate
    train_loader = create_train_loader(
        dataset_train, data_config, batch_size, cfg.aug, subset=cfg.train_subset, drop_last=mixup_fn is not None,
        num_replicas=world, rank=accelerator.process_index, repeated_aug=int(cfg.repeated_aug or 0),
        seed=int(cfg.seed), **loading)
    if len(train_loader) == 0:
        raise UserError(f'no training batches: {len(train_loader.dataset)} samples, batch_size={cfg.batch_size}')
    eval_loader, _ = create_eval_loader(cfg.data, data_config, int(cfg.eval_batch_size or 2 * batch_size), **loading)
    check_class_maps(cfg.data, dataset_train, eval_loader.dataset)
    shield_workers(train_loader)  # loader workers outlive a cluster's SIGTERM to every process (preemption.py)
    shield_workers(eval_loader)

    # Optimizer (lr scaled to the global batch), per-update schedule, loss, compilation, Accelerate, EMA.
    lr = recipe.scaled_lr(cfg, global_batch)
    optimizer = recipe.create_optimizer(model, cfg.optim, lr)
    updates_per_epoch = math.ceil(len(train_loader) / int(cfg.grad_accum))
    lr_scheduler, num_epochs = recipe.create_scheduler(optimizer, cfg, updates_per_epoch)
    loss_fn = recipe.create_loss(cfg, mixup_fn is not None)
    if _wants_compile(cfg, accelerator.device):
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if world > 1:
        eval_loader = accelerator.prepare(eval_loader)
    # The timm model itself, without DDP or the compile wrapper (whose state-dict keys start with _orig_mod.).
    # Under DDP the compile wrapper is inside DDP, where Accelerate's unwrap_model leaves it: peel it here.
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    raw_model = getattr(raw_model, '_orig_mod', raw_model)
    model_ema = recipe.create_ema(raw_model, cfg.ema)
    parts = TrainParts(accelerator, model, raw_model, model_ema, optimizer, lr_scheduler, loss_fn, mixup_fn,
                       train_loader, eval_loader, clip_grad=cfg.clip_grad, nonfinite=str(cfg.nonfinite),
                       log_interval=int(cfg.log_interval), progress=cfg.progress is True or (cfg.progress == 'auto' and sys.stderr.isatty()), stop=StopSignals())

    setup = RunSetup(dataset_train, num_classes, model_name, model_args, data_config, global_batch, lr, num_epochs,
                     updates_per_epoch)
    return parts, setup


def _continue_with(run_dir: str) -> str:
    """The overrides that continue this job: its run folder's checkpoint, or a -m sweep's every job's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra
        return f'resume=auto hydra.run.dir={run_dir}'
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f'resume=auto hydra.sweep.dir={os.path.abspath(hydra_cfg.sweep.dir)}'
    return f'resume=auto hydra.run.dir={run_dir}'


def _wants_compile(cfg: DictConfig, device: torch.device) -> bool:
    compile_opt = cfg.compile
    return compile_opt is True or str(compile_opt).lower() == 'true' or (
        compile_opt == 'auto' and device.type == 'cuda')


def _sparsity_batch(model, dataset, device) -> Optional[torch.Tensor]:
    """The fixed batch that attention sparsity is measured on, or None for a model without kernel attention."""
    if not AttentionSparsity(model).layers or len(dataset) == 0:
        return None
    samples = dataset.first(SPARSITY_IMAGES) if isinstance(dataset, StreamingImages) else \
        [dataset[i] for i in range(min(SPARSITY_IMAGES, len(dataset)))]
    return torch.stack([image for image, _ in samples]).to(device)


def _test(parts: TrainParts) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Test metrics of the model and of its EMA (None without one)."""
    metrics = evaluate(parts.model, parts.eval_loader, parts.accelerator)
    ema = parts.model_ema
    return metrics, evaluate(ema.module, parts.eval_loader, parts.accelerator) if ema is not None else None


def _epoch_summary(done: int, num_epochs: int, stats: Dict[str, Any], evaluated: bool, metrics, ema_metrics,
                   sparsity) -> Tuple[Dict[str, Any], str]:
    """The epoch's record in results.json's history and its log line."""
    line = (f"epoch {done}/{num_epochs}  train loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
            f"{stats['images_per_s']:.0f} img/s  {stats['time_s']:.0f} s  data wait {stats['data_wait_fraction']:.0%}")
    record = {'epoch': done, 'train_loss': stats['loss'], 'lr': stats['lr'],
              'train_images_per_s': stats['images_per_s'], 'data_wait_fraction': stats['data_wait_fraction']}
    if evaluated:
        line += f"  |  test top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}"
        record.update(top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
        if ema_metrics is not None:
            line += f"  |  EMA top-1 {ema_metrics['top1']:.2f}"
            record.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
        if sparsity is not None:
            line += f"  |  sparsity {sparsity['mean']:.3f}"
            record['sparsity'] = sparsity['mean']
    return record, line


def _keep_best(state: TrainState, parts: TrainParts, metrics, ema_metrics) -> Optional[Dict[str, torch.Tensor]]:
    """The raw or EMA weights with the best test top-1 so far: recorded in the state, and returned (to be written
    as best.safetensors after the checkpoint) when they beat the best before; else None."""
    candidates = [(metrics['top1'], False)]
    if ema_metrics is not None:
        candidates.append((ema_metrics['top1'], True))
    top1, is_ema = max(candidates, key=lambda c: c[0])
    if top1 > state.best['top1']:
        state.best = {'top1': top1, 'epoch': state.epoch, 'ema': is_ema}
        return (parts.model_ema.module if is_ema else parts.raw_model).state_dict()
    return None
