"""One training job, from a composed Hydra config to a finished run folder (what ``train.py`` runs).

``run_training`` is three stages, each reading top to bottom as the recipe, as DeiT's ``main()`` does: ``start``
(config -> data set -> model -> loaders -> optimizer, schedule, loss, mixup, EMA -> resume -> the run folder),
``train_epochs`` (train, evaluate, log, best, checkpoint) and ``finish`` (results). What they call:

* recipe.py: timm's model, loss, mixup / cutmix, scaled lr, optimizer, schedule and EMA from the config;
* vit_gka.data: the data sets, transforms and loaders, and the seeded order that makes resume exact;
* loop.py: one epoch of updates (with the non-finite guard) and the evaluation;
* state.py: the run's parts (``TrainParts``) and its checkpointed state (``TrainState``): save, load, resume;
* results.py: what the run folder records (config.yaml, steps.jsonl, tb/, best.safetensors, model/,
  results.json);
* distributed.py: Accelerate, the run folder every process shares (and its lock: one writer per folder);
* checkpointer.py: when and where the run saves checkpoints/last, and the stop after a signal's checkpoint;
* preemption.py: SIGTERM / SIGUSR2 / SIGUSR1 / SIGINT stop the run at the next update with a checkpoint (exit 75).

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
import dataclasses
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
from vit_gka.data.loaders import TrainLoaderSettings, create_eval_loader, create_train_loader
from vit_gka.data.sampling import set_loader_epoch
from vit_gka.data.streaming import StreamingImages
from vit_gka.errors import NonFiniteError, UserError
from vit_gka.measure.attention import AttentionSparsity, model_sparsity
from vit_gka.train import recipe
from vit_gka.train.checkpoint import BEST_FILE
from vit_gka.train.checkpoint_history import keep_epoch_checkpoint
from vit_gka.train.checkpointer import Checkpointer
from vit_gka.train.distributed import from_main_process, lock_run_dir, make_accelerator, shared_run_dir
from vit_gka.train.finetune import apply_finetune
from vit_gka.train.guards import check_class_maps, check_patch_grid, refuse_finished
from vit_gka.train.loop import EpochStats, evaluate, train_one_epoch
from vit_gka.train.preemption import StopSignals, shield_workers
from vit_gka.train.results import RunRecords, summary_line
from vit_gka.train.state import TrainParts, TrainState, resume, resume_checkpoint, run_dir_of
from vit_gka.train.validation import validate

log = logging.getLogger('vit_gka.train')

__all__ = ['run_training', 'start', 'train_epochs', 'finish', 'Run', 'build_parts', 'RunSetup', 'SPARSITY_IMAGES']

# Attention sparsity (fraction of exact zeros of the attention weights, per layer) is measured on the first
# SPARSITY_IMAGES test images, one extra forward per evaluation (models with kernel attention only).
SPARSITY_IMAGES = 64


def run_training(cfg: DictConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns results.json's content on every process (the main process
    writes it, the others receive it). Every input is checked before anything is written."""
    run = start(cfg)  # config, processes, run folder, parts, resume: checked; then the folder taken, records open
    metrics, ema_metrics = train_epochs(run)  # train, evaluate, log, keep the best, checkpoint
    return finish(run, metrics, ema_metrics)  # results.json, model/, the summary line; on every process


@dataclasses.dataclass
class Run:
    """One job's live state between its stages (``start`` makes it)."""
    cfg: DictConfig
    accelerator: Any
    run_dir: str
    parts: TrainParts
    setup: 'RunSetup'
    state: TrainState
    records: RunRecords
    saver: Checkpointer
    lock: Any
    stop_epoch: int
    sparsity_images: Optional[torch.Tensor]
    bad_images: int


def start(cfg: DictConfig) -> Run:
    """Validate, start the processes, find the run folder and the checkpoint to resume from (a bad one stops before
    anything is built), build the parts and resume or seed; only then take the folder and open its records."""
    from accelerate.utils import set_seed
    started = time.time()
    validate(cfg)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)
    run_dir = shared_run_dir(accelerator)
    chk = resume_checkpoint(cfg.resume, run_dir)  # resume=auto: this run folder's own checkpoint, if any

    parts, setup = build_parts(cfg, accelerator, finetune=chk is None)  # a resumed run has its own weights
    sparsity_images = _sparsity_batch(parts.raw_model, parts.eval_loader.dataset, accelerator.device) if main else None
    # Resume (every check before anything is loaded), or start: drop path etc. then differ per process.
    state = TrainState(setup.model_name, setup.model_args, epochs=setup.num_epochs,
                       global_batch_size=setup.global_batch, seed=int(cfg.seed), data=str(cfg.data.name),
                       train_subset=cfg.train_subset, started=started)
    if chk is not None:
        state = resume(chk, state, parts)
    else:
        set_seed(int(cfg.seed) + accelerator.process_index)

    # Every input has been checked: take the run folder (one writer per folder), start writing.
    if chk is None:
        refuse_finished(run_dir)
    lock = lock_run_dir(accelerator, run_dir)
    records = RunRecords(cfg, run_dir, enabled=main, accelerator=accelerator)
    records.open(run_dir_of(chk.folder) if chk is not None else None, state.num_updates)
    if chk is not None and not state.step and state.best['epoch'] == state.epoch and \
            not os.path.exists(os.path.join(run_dir, BEST_FILE)):  # lost to a failed write after the checkpoint
        records.best((parts.model_ema.module if state.best['ema'] else parts.raw_model).state_dict(), state.num_updates)
    _log_setup(cfg, accelerator, run_dir, parts, setup)
    stop_epoch = min(int(cfg.stop_epoch), setup.num_epochs) if cfg.stop_epoch is not None else setup.num_epochs
    saver = Checkpointer(run_dir, state, parts, records, chk, cfg.checkpoint_every_steps)
    return Run(cfg, accelerator, run_dir, parts, setup, state, records, saver, lock, stop_epoch, sparsity_images,
               unreadable_images(parts.train_loader.dataset))


def train_epochs(run: Run) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """The epochs from the state's to ``stop_epoch``, each: train, evaluate (every ``eval_interval`` epochs and after
    the last), log, keep the best, checkpoint; a stop signal checkpoints and ends the run (preemption.py). Returns
    the last evaluation's metrics (None, None if no epoch was left)."""
    from accelerate import skip_first_batches
    parts, state, records, saver = run.parts, run.state, run.records, run.saver
    main, train_loader = run.accelerator.is_main_process, parts.train_loader
    metrics = ema_metrics = None
    with parts.stop:  # SIGTERM / SIGUSR2 / SIGUSR1 / SIGINT: checkpoint at the next update boundary, then stop
        for epoch in range(state.epoch, run.stop_epoch):
            set_loader_epoch(train_loader, epoch, run.accelerator.process_index)
            # resumed mid-epoch: the same order, the first state.step batches not loaded
            loader = skip_first_batches(train_loader, state.step) if state.step else train_loader
            try:
                stats = train_one_epoch(parts, state, epoch, loader, saver.on_update, records if main else None,
                                        desc=f'epoch {epoch + 1}/{run.setup.num_epochs}')
            except NonFiniteError as e:
                raise e.with_checkpoint(saver.last_good()) from None
            finally:
                records.close_steps()
            state.end_epoch(dataclasses.asdict(stats))  # TrainState.end_epoch reads the numbers by name
            _warn_unreadable(run)
            evaluated = state.epoch == run.stop_epoch or (
                int(run.cfg.eval_interval or 0) > 0 and state.epoch % int(run.cfg.eval_interval) == 0)
            sparsity = None
            if evaluated:
                metrics, ema_metrics = _test(parts)
                if run.sparsity_images is not None:
                    sparsity = model_sparsity(parts.raw_model, run.sparsity_images, run.accelerator.autocast)
            _end_epoch(run, stats, metrics if evaluated else None, ema_metrics if evaluated else None, sparsity)
            signal_name = parts.stop.agreed(run.accelerator)
            if signal_name and state.epoch < run.stop_epoch:
                saver.stopped(signal_name, f'after epoch {state.epoch} (update {state.num_updates})')
    return metrics, ema_metrics


def finish(run: Run, metrics, ema_metrics) -> Dict[str, Any]:
    """results.json, the model folder and the summary line (main process), then results.json's content on every
    process. A stop signal now only waits for them: the run is done, and a half-written model/ would help nobody."""
    parts, accelerator = run.parts, run.accelerator
    with parts.stop:
        if metrics is None:  # resumed at (or past) the last epoch: evaluate what was loaded
            metrics, ema_metrics = _test(parts)
        labels = class_names(run.setup.dataset_train)
        results = run.records.results(parts, run.state, metrics, ema_metrics, run.sparsity_images, run.bad_images,
                                      labels if labels is not None and len(labels) == run.setup.num_classes else None)
        run.records.close()
    if parts.stop.received:
        log.info('%s came after the last epoch\'s checkpoint: the run finished first',
                 ', '.join(signal.Signals(s).name for s in parts.stop.received))
    if run.lock is not None:
        run.lock.release()
    if accelerator.is_main_process:
        print(summary_line(results, run.cfg.model_choice, run.run_dir), flush=True)
    accelerator.wait_for_everyone()
    results = from_main_process(accelerator, results)
    # Nobody leaves while another process still receives (a gloo peer that exits mid-broadcast aborts the other:
    # "terminate called without an active exception"); then every process takes the process group down.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _end_epoch(run: Run, stats: EpochStats, metrics, ema_metrics, sparsity) -> None:
    """An epoch's records (history, summary.csv, TensorBoard), its checkpoint, then best.safetensors if it is the
    best (never ahead of the checkpoint), and its log line."""
    state, parts, records, saver = run.state, run.parts, run.records, run.saver
    record, line = _epoch_summary(state.epoch, run.setup.num_epochs, stats, metrics is not None, metrics,
                                  ema_metrics, sparsity)
    state.history.append(record)
    records.epoch(state.epoch, state.num_updates, stats, parts.raw_model, metrics, ema_metrics, sparsity)
    records.summary(state.history)
    best = _keep_best(state, parts, metrics, ema_metrics) if metrics is not None else None
    try:
        saver.save()
        if run.accelerator.is_main_process:  # checkpoint_keep=n: also this epoch's, the last n kept
            keep_epoch_checkpoint(saver.last_dir, state.epoch, int(run.cfg.checkpoint_keep))
        if best is not None:
            records.best(best, state.num_updates)
    except NonFiniteError as e:
        raise e.with_checkpoint(saver.last_good()) from None
    log.info(line)
    run.accelerator.wait_for_everyone()


def _warn_unreadable(run: Run) -> None:
    bad = unreadable_images(run.parts.train_loader.dataset)
    if bad > run.bad_images:
        run.bad_images = bad
        log.warning('%d unreadable training images skipped so far (the warnings name them)', bad)


def _log_setup(cfg: DictConfig, accelerator, run_dir: str, parts: TrainParts, setup: 'RunSetup') -> None:
    train_loader = parts.train_loader
    log.info('%s %s: %.2f M parameters, data %s (%d train / %d test images, %d classes, transformed per %s, %d '
             'loader workers per process), input %s', cfg.model_choice, setup.model_name,
             sum(p.numel() for p in parts.raw_model.parameters()) / 1e6, cfg.data.name, len(train_loader.dataset),
             len(parts.eval_loader.dataset), setup.num_classes,
             'batch' if isinstance(train_loader.dataset, InMemoryImages) else 'sample', train_loader.num_workers,
             tuple(setup.data_config['input_size']))
    log.info('global batch %d = %d per process x %d processes x %d accumulation; lr %.3g (base %.3g, %s '
             'scaling per %d); %d epochs x %d updates; device %s, mixed precision %s; run dir %s',
             setup.global_batch, int(cfg.batch_size), accelerator.num_processes, int(cfg.grad_accum), setup.lr,
             float(cfg.lr), cfg.lr_scale, int(cfg.lr_base_size), setup.num_epochs, setup.updates_per_epoch,
             accelerator.device, accelerator.mixed_precision, run_dir)


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
    loader_settings = TrainLoaderSettings.from_config(
        cfg, world, accelerator.process_index, on_cpu=accelerator.device.type == 'cpu', drop_last=mixup_fn is not None)
    train_loader = create_train_loader(dataset_train, data_config, loader_settings)
    if len(train_loader) == 0:
        raise UserError(f'no training batches: {len(train_loader.dataset)} samples, batch_size={cfg.batch_size}')
    eval_loader, _ = create_eval_loader(cfg.data, data_config, int(cfg.eval_batch_size or 2 * batch_size),
                                        **loader_settings.for_eval())
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
                       log_interval=int(cfg.log_interval),
                       progress=cfg.progress is True or (cfg.progress == 'auto' and sys.stderr.isatty()),
                       stop=StopSignals())

    setup = RunSetup(dataset_train, num_classes, model_name, model_args, data_config, global_batch, lr, num_epochs,
                     updates_per_epoch)
    return parts, setup


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


def _epoch_summary(done: int, num_epochs: int, stats: EpochStats, evaluated: bool, metrics, ema_metrics,
                   sparsity) -> Tuple[Dict[str, Any], str]:
    """The epoch's record in results.json's history and its log line."""
    line = (f'epoch {done}/{num_epochs}  train loss {stats.loss:.4f}  lr {stats.lr:.2e}  '
            f'{stats.images_per_s:.0f} img/s  {stats.time_s:.0f} s  data wait {stats.data_wait_fraction:.0%}')
    record = {'epoch': done, 'train_loss': stats.loss, 'lr': stats.lr,
              'train_images_per_s': stats.images_per_s, 'data_wait_fraction': stats.data_wait_fraction}
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
