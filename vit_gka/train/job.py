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
    results.json             the numbers (see results.py)

Only the main process writes. Distributed runs (``accelerate launch`` / ``torchrun``) shard the training
set (timm's RepeatAugSampler with repeated augmentation, else DistributedSampler) and the test set.
The recipe (model, loss, mixup, optimizer, schedule, EMA) comes from recipe.py, the loop from engine.py.
"""
import logging
import math
import os
import time
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import recipe
from vit_gka.train.checkpoint import save_checkpoint, save_weights, write_text
from vit_gka.errors import UserError
from vit_gka.data.datasets import create_dataset, create_eval_loader, create_train_loader, unreadable_images
from vit_gka.train.distributed import make_accelerator, shared_run_dir
from vit_gka.train.loop import evaluate, sigma_stats, train_one_epoch
from vit_gka.train.faults import NonFiniteError, StepLog
from vit_gka.layers.compact import AttentionSparsity, model_sparsity
from vit_gka.train.loading import gather_process_states, load_checkpoint, restore_training, run_dir_of
from vit_gka.train.results import summary_line, write_results
from vit_gka.data.sampling import set_loader_epoch
from vit_gka.train.validation import validate  # noqa: F401  (trainer.validate, as before)

log = logging.getLogger('vit_gka.train')

# Attention sparsity (fraction of exact zeros of the attention weights, per layer) is measured on the first
# SPARSITY_IMAGES test images, one extra forward per evaluation (models with kernel attention only).
SPARSITY_IMAGES = 64


def _sparsity_batch(model, dataset, device) -> Optional[torch.Tensor]:
    """The fixed batch that attention sparsity is measured on, or None for a model without kernel attention."""
    if not AttentionSparsity(model).layers or len(dataset) == 0:
        return None
    return torch.stack([dataset[i][0] for i in range(min(SPARSITY_IMAGES, len(dataset)))]).to(device)


def _wants_compile(cfg: DictConfig, device: torch.device) -> bool:
    compile_opt = cfg.get('compile', 'auto')
    return compile_opt is True or str(compile_opt).lower() == 'true' or (
        compile_opt == 'auto' and device.type == 'cuda')


def run_training(cfg: DictConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns results.json's content (on every process)."""
    job = TrainingJob(cfg)
    job.open_run_dir()
    for epoch in range(job.start_epoch, job.stop_epoch):
        stats = job.train_epoch(epoch)
        job.end_epoch(epoch, stats)
    return job.finish()


class TrainingJob:
    """One job's model, data, recipe and bookkeeping. Building it checks every input and writes nothing;
    ``open_run_dir`` starts writing, then ``train_epoch`` and ``end_epoch`` run each epoch and ``finish`` ends."""

    def __init__(self, cfg: DictConfig):
        from accelerate.utils import set_seed
        self.wall_start = time.time()
        validate(cfg)
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.main = self.accelerator.is_main_process
        if not self.main:
            log.setLevel(logging.WARNING)
        self.run_dir = shared_run_dir(self.accelerator)
        self.chk = load_checkpoint(cfg.resume) if cfg.get('resume') else None
        _, self.num_classes = create_dataset(cfg.data, 'train') if cfg.data.get('num_classes') is None else (
            None, int(cfg.data.num_classes))
        set_seed(int(cfg.seed))  # the same initial weights on every process
        model = self._model_and_data()
        self._prepare_training(model)
        state = restore_training(self.chk, dict(model_name=self.model_name, model_args=self.model_args,
                                                epochs=self.num_epochs, global_batch_size=self.global_batch),
                                 self.raw_model, self.model_ema, self.optimizer, self.lr_scheduler, self.accelerator)
        if self.chk is None:
            set_seed(int(cfg.seed) + self.accelerator.process_index)  # drop path etc. differ per process
        self.start_epoch, self.start_step, self.totals = state['epoch'], state['step'], state['totals']
        self.num_updates, self.best, self.history = state['num_updates'], state['best'], state['history']
        self.nonfinite_skipped, self.prev_wall = state['nonfinite_skipped'], state['wall_time_s']
        self.train_time, self.train_images = state['train_time_s'], state['train_images']
        stop = cfg.get('stop_epoch')
        self.stop_epoch = min(int(stop), self.num_epochs) if stop is not None else self.num_epochs
        self.eval_interval = int(cfg.get('eval_interval', 1) or 0)
        self.metrics = self.ema_metrics = None
        self.last_dir = os.path.join(self.run_dir, 'checkpoints', 'last')
        self.saved_at = None  # the update of the last checkpoint written

    def _model_and_data(self):
        """The model (timm, seeded) and the train / test loaders; the scaled lr and mixup of this batch size."""
        from timm.data import resolve_data_config
        cfg, accelerator = self.cfg, self.accelerator
        self.model_name = str(cfg.model.name)
        self.model_args = recipe.model_args(cfg, self.num_classes)
        model = recipe.create_model(self.model_name, self.model_args, cfg.data)
        self.data_config = resolve_data_config({}, model=model)
        self.world = accelerator.num_processes
        self.global_batch = int(cfg.batch_size) * self.world * int(cfg.grad_accum)
        self.lr = recipe.scaled_lr(cfg, self.global_batch)
        self.mixup_fn = recipe.create_mixup(cfg, self.num_classes)
        self.train_loader, _ = create_train_loader(
            cfg.data, self.data_config, int(cfg.batch_size), aug_cfg=cfg.aug, num_workers=int(cfg.workers),
            subset=cfg.get('train_subset'), drop_last=self.mixup_fn is not None, num_replicas=self.world,
            rank=accelerator.process_index, repeated_aug=int(cfg.get('repeated_aug', 0) or 0), seed=int(cfg.seed))
        self.eval_loader, _ = create_eval_loader(
            cfg.data, self.data_config, int(cfg.get('eval_batch_size') or 2 * cfg.batch_size),
            num_workers=int(cfg.workers))
        self.sparsity_images = (_sparsity_batch(model, self.eval_loader.dataset, accelerator.device)
                                if self.main else None)
        if len(self.train_loader) == 0:
            raise UserError(f'no training batches: {len(self.train_loader.dataset)} samples, '
                            f'batch_size={cfg.batch_size}')
        return model

    def _prepare_training(self, model) -> None:
        """Optimizer, schedule, loss, compilation, Accelerate's wrapping and the EMA."""
        cfg, accelerator = self.cfg, self.accelerator
        optimizer = recipe.create_optimizer(model, cfg.optim, self.lr)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / int(cfg.grad_accum))
        self.lr_scheduler, self.num_epochs = recipe.create_scheduler(optimizer, cfg, self.updates_per_epoch)
        self.loss_fn = recipe.create_loss(cfg, self.mixup_fn is not None)
        if _wants_compile(cfg, accelerator.device):
            model = torch.compile(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if self.world > 1:
            self.eval_loader = accelerator.prepare(self.eval_loader)
        self.raw_model = accelerator.unwrap_model(self.model)
        self.model_ema = recipe.create_ema(self.raw_model, cfg.ema)

    def open_run_dir(self) -> None:
        """Start writing (every check of the input has passed): config.yaml, steps.jsonl, TensorBoard."""
        cfg, accelerator = self.cfg, self.accelerator
        self.tb = None
        self.step_log = StepLog(self.run_dir, enabled=self.main and bool(cfg.get('step_log', True)))
        if self.main:
            os.makedirs(self.run_dir, exist_ok=True)
            write_text(os.path.join(self.run_dir, 'config.yaml'), OmegaConf.to_yaml(cfg, resolve=True))
            self.step_log.carry_over(run_dir_of(self.chk.folder) if self.chk is not None else None,
                                     self.num_updates)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.run_dir, 'tb'))
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        log.info('%s %s: %.2f M parameters, data %s (%d train / %d test images, %d classes), input %s',
                 cfg.get('model_choice', self.model_name), self.model_name, n_params / 1e6, cfg.data.name,
                 len(self.train_loader.dataset), len(self.eval_loader.dataset), self.num_classes,
                 tuple(self.data_config['input_size']))
        log.info('global batch %d = %d per process x %d processes x %d accumulation; lr %.3g (base %.3g, %s '
                 'scaling per %d); %d epochs x %d updates; device %s, mixed precision %s; run dir %s',
                 self.global_batch, int(cfg.batch_size), self.world, int(cfg.grad_accum), self.lr, float(cfg.lr),
                 cfg.get('lr_scale', 'linear'), int(cfg.get('lr_base_size', 512)), self.num_epochs,
                 self.updates_per_epoch, accelerator.device, accelerator.mixed_precision, self.run_dir)
        self.bad_images = unreadable_images(self.train_loader.dataset)

    def _wall_time(self) -> float:
        return self.prev_wall + time.time() - self.wall_start

    def save(self, epoch: int, step: int, updates: int, partial: Optional[Dict[str, Any]] = None) -> None:
        """The checkpoint to continue at (epoch, step); a collective (every process's RNGs and partial sums)."""
        procs = gather_process_states(self.accelerator, {'totals': partial})
        if self.main:
            cfg, ema = self.cfg, self.model_ema
            state = {
                'epoch': epoch, 'step': step, 'num_updates': updates,
                'optimizer': self.optimizer.state_dict(), 'scheduler': self.lr_scheduler.state_dict(),
                'ema': {'decay': float(cfg.ema.decay), 'warmup': bool(cfg.ema.get('warmup', False)),
                        'num_updates': updates} if ema is not None else None,
                'rng': [p['rng'] for p in procs], 'procs': procs, 'best': self.best, 'history': self.history,
                'model_name': self.model_name, 'model_args': self.model_args, 'seed': int(cfg.seed),
                'global_batch_size': self.global_batch, 'epochs': self.num_epochs,
                'wall_time_s': self._wall_time(), 'train_time_s': self.train_time,
                'train_images': self.train_images, 'nonfinite_skipped': self.nonfinite_skipped,
            }
            save_checkpoint(self.last_dir, self.raw_model.state_dict(), state,
                            ema.module.state_dict() if ema is not None else None)
        self.saved_at = updates

    def _on_update(self, info: Dict[str, Any]) -> None:
        """After every optimizer update: its line in steps.jsonl; every checkpoint_every_steps a checkpoint."""
        self.step_log.write({'epoch': info['epoch'] + 1, **{k: info[k] for k in ('step', 'update', 'loss', 'lr',
                                                                                  'skipped')}})
        every = self.cfg.get('checkpoint_every_steps')
        if every and info['update'] % int(every) == 0 and info['step'] < len(self.train_loader):
            self.save(info['epoch'], info['step'], info['update'], info['totals'])

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One epoch of updates (the rest of it after a mid-epoch resume); returns its statistics."""
        cfg, loader = self.cfg, self.train_loader
        set_loader_epoch(loader, epoch, self.accelerator.process_index)
        if self.start_step:  # resumed mid-epoch: the same order, the first start_step batches not loaded
            from accelerate import skip_first_batches
            loader = skip_first_batches(loader, self.start_step)
        try:
            stats = train_one_epoch(
                self.model, loader, self.optimizer, self.loss_fn, self.accelerator, epoch,
                lr_scheduler=self.lr_scheduler, num_updates=self.num_updates, mixup_fn=self.mixup_fn,
                model_ema=self.model_ema, clip_grad=cfg.get('clip_grad'), tb_writer=self.tb,
                log_interval=int(cfg.get('log_interval', 50)), progress=bool(cfg.get('progress', True)),
                desc=f'epoch {epoch + 1}/{self.num_epochs}', start_step=self.start_step, totals=self.totals,
                nonfinite=str(cfg.get('nonfinite', 'stop')), on_update=self._on_update)
        except NonFiniteError as e:
            raise e.with_checkpoint(f'{self.last_dir} (update {self.saved_at})' if self.saved_at is not None else
                                    self.chk.folder if self.chk is not None else None) from None
        finally:
            self.step_log.close()
        self.nonfinite_skipped += stats['skipped']  # the epoch's, including those before a mid-epoch resume
        self.start_step, self.totals = 0, None
        self.num_updates = stats['num_updates']
        self.lr_scheduler.step(epoch + 1)
        self.train_time += stats['time_s']
        self.train_images += stats['images']
        bad_images = unreadable_images(self.train_loader.dataset)
        if bad_images > self.bad_images:
            self.bad_images = bad_images
            log.warning('%d unreadable training images skipped so far (the warnings name them)', bad_images)
        return stats

    def _test(self) -> None:
        """Test metrics of the model and of its EMA."""
        self.metrics = evaluate(self.model, self.eval_loader, self.accelerator)
        if self.model_ema is not None:
            self.ema_metrics = evaluate(self.model_ema.module, self.eval_loader, self.accelerator)

    def end_epoch(self, epoch: int, stats: Dict[str, Any]) -> None:
        """Evaluate (every eval_interval epochs and after the last), log, keep the best weights, checkpoint."""
        done = epoch + 1
        do_eval = done == self.stop_epoch or (self.eval_interval > 0 and done % self.eval_interval == 0)
        line = (f"epoch {done}/{self.num_epochs}  train loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
                f"{stats['images_per_s']:.0f} img/s  {stats['time_s']:.0f} s")
        record = {'epoch': done, 'train_loss': stats['loss'], 'lr': stats['lr'],
                  'train_images_per_s': stats['images_per_s']}
        sparsity = None
        if do_eval:
            self._test()
            metrics, ema_metrics = self.metrics, self.ema_metrics
            line += f"  |  test top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}"
            record.update(top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
            if ema_metrics is not None:
                line += f"  |  EMA top-1 {ema_metrics['top1']:.2f}"
                record.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
            if self.sparsity_images is not None:
                sparsity = model_sparsity(self.raw_model, self.sparsity_images, self.accelerator.autocast)
                line += f"  |  sparsity {sparsity['mean']:.3f}"
                record['sparsity'] = sparsity['mean']
        self.history.append(record)
        if self.main:
            self._log_tensorboard(done, stats, do_eval, sparsity)
        if do_eval:
            self._keep_best(done)
        self.save(done, 0, self.num_updates)
        log.info(line)
        self.accelerator.wait_for_everyone()

    def _log_tensorboard(self, done: int, stats: Dict[str, Any], evaluated: bool, sparsity) -> None:
        tb = self.tb
        tb.add_scalar('train/epoch_loss', stats['loss'], done)
        tb.add_scalar('train/images_per_s', stats['images_per_s'], done)
        for layer, s in sigma_stats(self.raw_model).items():
            for k, v in s.items():
                tb.add_scalar(f'sigma/layer{layer:02d}/{k}', v, done)
        if evaluated:
            for key in ('loss', 'top1', 'top5', 'images_per_s'):
                tb.add_scalar(f'eval/{key}', self.metrics[key], done)
            if self.ema_metrics is not None:
                tb.add_scalar('eval/ema_top1', self.ema_metrics['top1'], done)
                tb.add_scalar('eval/ema_top5', self.ema_metrics['top5'], done)
        if sparsity is not None:
            for i, value in enumerate(sparsity['layers']):
                tb.add_scalar(f'sparsity/layer_{i:02d}', value, done)
            tb.add_scalar('sparsity/mean', sparsity['mean'], done)
        tb.flush()

    def _keep_best(self, done: int) -> None:
        """best.safetensors: the raw or EMA weights with the best test top-1 so far."""
        candidates = [(self.metrics['top1'], False)]
        if self.ema_metrics is not None:
            candidates.append((self.ema_metrics['top1'], True))
        top1, is_ema = max(candidates, key=lambda c: c[0])
        if top1 > self.best['top1']:
            self.best = {'top1': top1, 'epoch': done, 'ema': is_ema}
            if self.main:
                weights = (self.model_ema.module if is_ema else self.raw_model).state_dict()
                save_weights(weights, os.path.join(self.run_dir, 'best.safetensors'))

    def finish(self) -> Optional[Dict[str, Any]]:
        """results.json, the model folder and the summary line (main process); returns the results."""
        if self.metrics is None:  # resumed at (or past) the last epoch: evaluate what was loaded
            self._test()
        results = None
        if self.main:
            results = write_results(
                self.cfg, self.run_dir, self.raw_model, self.model_ema, self.model_name, self.model_args,
                self.num_classes, self.num_epochs, self.global_batch, self.metrics, self.ema_metrics, self.best,
                self.history, self.train_images / max(self.train_time, 1e-9), self._wall_time(), self.stop_epoch,
                self.sparsity_images, self.accelerator.autocast,
                faults={'nonfinite_skipped': self.nonfinite_skipped, 'unreadable_images': self.bad_images})
            self.tb.close()
            print(summary_line(results, self.cfg.get('model_choice', self.model_name), self.run_dir), flush=True)
        self.accelerator.wait_for_everyone()
        return results
