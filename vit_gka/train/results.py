"""What a run writes into its folder besides checkpoints, from the main process only (``RunRecords``).

    config.yaml        the resolved configuration (when the run starts, every input check passed)
    steps.jsonl        one line per optimizer update: epoch, step within the epoch (micro-batches done), update,
                       loss (mean over the update's images on all processes; null when skipped) and lr
                       (``step_log: true``); on ``resume=`` the lines up to the checkpoint are carried over and
                       the rest dropped, so the file of a killed-and-resumed run is the file of an uninterrupted one
    tb/                TensorBoard events (Accelerate's trackers, ``log_with``; W&B, MLflow, ... get the same),
                       on the optimizer-update axis: the run's hyperparameters (hparams view); train loss / lr /
                       grad norm / images per s / data-wait share per log_interval updates (loop.py); per epoch
                       the epoch loss, speed, data wait, peak GPU memory, GKA bandwidths, test metrics and
                       attention sparsity
    summary.csv        one row per epoch (timm's train.py columns first: ``SUMMARY_COLUMNS``)
    best.safetensors   the best weights by test top-1 (raw or EMA, results.json says which)
    model/             timm save_for_hf folder of the final weights (the better of raw and EMA):
                       timm.create_model('local-dir:<run>/model', pretrained=True)
    results.json       the numbers: ``RunResults``, which ``RunRecords.results`` writes
"""
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import socket
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from vit_gka.measure.flops import model_stats
from vit_gka.measure.attention import model_sparsity
from vit_gka.train.checkpoint import (BEST_FILE, CHECKPOINTS, LAST, MODEL_DIR, PREV, save_model_folder, save_weights,
                                      write_failed, write_text)
from vit_gka.train.faults import test_fail_write
from vit_gka.train.loop import EpochStats, UpdateInfo, sigma_stats
from vit_gka.train.trackers import finish_trackers, start_trackers
from vit_gka.train.state import require_finite

log = logging.getLogger('vit_gka.train')

__all__ = ['RunRecords', 'RunResults', 'summary_line', 'STEP_LOG']

STEP_LOG = 'steps.jsonl'
_STEP_KEYS = ('step', 'update', 'loss', 'lr', 'skipped')  # after 'epoch', in this order


def _carried_steps(source_run_dir: Optional[str], upto_update: int) -> str:
    """The lines of ``<source_run_dir>/steps.jsonl`` up to update ``upto_update`` ('' without one)."""
    source = os.path.join(source_run_dir, STEP_LOG) if source_run_dir else None
    lines = []
    if source and os.path.isfile(source):
        with open(source) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # the last line of a killed run may be cut short
                    continue
                if isinstance(record, dict) and int(record.get('update', 0)) <= upto_update:
                    lines.append(json.dumps(record) + '\n')
    return ''.join(lines)


def _img_size(model) -> Any:
    size = tuple(model.pretrained_cfg['input_size'][1:])
    return size[0] if size[0] == size[1] else list(size)


def _sigma_init(model) -> Optional[float]:
    for module in model.modules():
        if hasattr(module, 'log_sigma') and hasattr(module, 'sigma_init'):
            return float(module.sigma_init)
    return None


def _model_stats(model) -> Dict[str, Any]:
    was_training = model.training
    model.eval()
    try:
        return model_stats(model)
    finally:
        model.train(was_training)


def _architecture_args(model_args: Dict[str, Any]) -> Dict[str, Any]:
    """``create_model`` arguments without the drop rates (training-time regularisation, which timm leaves out of
    an exported config as well)."""
    return {k: v for k, v in model_args.items()
            if k not in ('drop_rate', 'drop_path_rate', 'drop_block_rate') and not k.endswith('_drop_rate')}


def hyperparameters(cfg: DictConfig) -> Dict[str, Any]:
    """The run's configuration as flat ``section/key: value`` pairs of numbers, strings and booleans (TensorBoard's
    hparams view takes nothing else; lists and nulls become strings)."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f'{prefix}/{k}' if prefix else str(k), v)
        else:
            flat[prefix] = node if isinstance(node, (bool, int, float, str)) else str(node)

    walk('', OmegaConf.to_container(cfg, resolve=True))
    return flat


# summary.csv: (column, key of a results.json history record)
SUMMARY_COLUMNS = (('epoch', 'epoch'), ('train_loss', 'train_loss'), ('eval_loss', 'loss'), ('eval_top1', 'top1'),
                   ('eval_top5', 'top5'), ('lr', 'lr'), ('ema_top1', 'ema_top1'), ('ema_top5', 'ema_top5'),
                   ('train_images_per_s', 'train_images_per_s'), ('data_wait_fraction', 'data_wait_fraction'))


@dataclasses.dataclass
class RunResults:
    """results.json: its keys, in the file's order (``RunRecords.results`` writes it with ``dataclasses.asdict``)."""
    model: str                          # the timm model name
    model_config: str                   # train.py's model= choice
    model_args: Dict[str, Any]          # the create_model keywords (state.TrainState.model_args)
    data: str                           # data.name
    num_classes: int
    img_size: Any                       # the input's side, or [height, width] when not square
    epochs: int                         # the schedule's epochs
    epochs_done: int
    seed: int
    global_batch_size: int              # per process x processes x accumulation
    train_subset: Optional[int]         # the first n training images only; None: all
    # the autocast of training and of every evaluation (no | bf16 | fp16 | fp8): eval.py evaluates the same
    mixed_precision: str
    # torch.compile'd (its fused kernels round differently from eager ones: eval.py allows for it)
    compiled: bool
    params: int                         # measure.flops.model_stats of the raw model, from here to size_mb
    params_attn: Optional[int]
    params_mlp: Optional[int]
    params_other: Optional[int]
    gmacs: Optional[float]
    gflops: Optional[float]
    size_mb: Optional[float]
    top1: float                         # the last evaluation of the raw model: test top-1 (percent)
    top5: float
    loss: float
    test_images: int                    # on every process together
    ema_top1: Optional[float]           # the last evaluation of the EMA; None without one
    ema_top5: Optional[float]
    best_top1: Optional[float]          # the best test top-1 of any evaluation (best.safetensors)
    best_epoch: Optional[int]
    best_is_ema: bool
    model_folder_weights: str           # which weights model/ holds: 'ema' or 'model'
    eval_images_per_s: float
    train_images_per_s: float
    # the share of training time spent waiting for the loader: near 0 when the model is the bottleneck
    data_wait_fraction: float
    # this process's allocator peak (weights, optimizer state, activations), CUDA only
    peak_gpu_mem_mb: Optional[float]
    wall_time_s: float
    host: str                           # where the job ran: the report measures speeds only on that machine
    sigma_init: Optional[float]         # the GKA bandwidth's initial value; None without GKA
    sigma: Dict[str, Dict[str, float]]  # per block of the model/ weights: mean / min / max sigma (loop.sigma_stats)
    # of the model/ weights on the first test images (job.SPARSITY_IMAGES); None without kernel attention
    sparsity: Optional[Dict[str, Any]]
    nonfinite_skipped: int              # updates skipped as non-finite (nonfinite.UpdateGuard)
    unreadable_images: int              # data.datasets.CheckedImageFolder
    history: List[Dict[str, Any]]       # one record per epoch (job.py)


class RunRecords:
    """The run folder's records (module docstring). Every method does nothing on other processes than the main
    one (``enabled=False``)."""

    def __init__(self, cfg: DictConfig, run_dir: str, enabled: bool, accelerator=None):
        self.cfg, self.run_dir, self.enabled, self.accelerator = cfg, run_dir, enabled, accelerator
        self.tracking = False  # Accelerate's trackers started (log_with)
        self._steps = None  # the open steps.jsonl
        self._step_log = enabled and cfg.step_log

    def open(self, resumed_from: Optional[str], upto_update: int) -> None:
        """Start writing: config.yaml, steps.jsonl (carried over from the run ``resumed_from`` up to update
        ``upto_update``), the TensorBoard writer."""
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        with self._writing('config.yaml') as path:
            write_text(path, OmegaConf.to_yaml(self.cfg, resolve=True))
        if self._step_log:
            with self._writing(STEP_LOG) as path:
                write_text(path, _carried_steps(resumed_from, upto_update))
        if self.accelerator is not None and self.accelerator.log_with:  # named for the sweep and the job
            start_trackers(self.accelerator, self.cfg, self.run_dir, hyperparameters(self.cfg))
            self.tracking = True

    @contextlib.contextmanager
    def _writing(self, name: str):
        """Yield ``<run>/<name>``; a failed write (a full or read-only disk) becomes one ``WriteError`` line, exit
        74, naming what to do: the writers are atomic, so the old file (or none) is left, never a half one."""
        path = os.path.join(self.run_dir, name)
        try:
            yield path
        except (OSError, SafetensorError) as e:
            last = os.path.join(self.run_dir, CHECKPOINTS, LAST)
            if os.path.isdir(last) or os.path.isdir(last + PREV):
                then = (f'the checkpoint {last} is intact: make room (or fix the disk), then continue with '
                        f'resume=auto hydra.run.dir={self.run_dir}')
            else:
                then = 'no checkpoint was written yet: make room (or fix the disk), then run the same command again'
            steps, self._steps = self._steps, None
            if steps is not None:
                with contextlib.suppress(OSError):  # its buffer cannot go to a full disk either
                    steps.close()
            raise write_failed(path, e, then) from e

    def log(self, values: Dict[str, float], update: int) -> None:
        """``values`` to every tracker (TensorBoard, W&B, ... : ``log_with``) at optimizer update ``update``."""
        if self.tracking:
            self.accelerator.log(values, step=update)

    def step(self, info: UpdateInfo) -> None:
        """steps.jsonl's line of one update (``info``: what loop.train_one_epoch passes its ``on_update``)."""
        if not self._step_log:
            return
        with self._writing(STEP_LOG) as path:  # a line cut short by a full disk is dropped when it resumes
            if self._steps is None:
                self._steps = open(path, 'a')
            record = dataclasses.asdict(info)
            self._steps.write(json.dumps({'epoch': record['epoch'] + 1, **{k: record[k] for k in _STEP_KEYS}}) + '\n')
            self._steps.flush()
            test_fail_write(path)

    def close_steps(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None

    def summary(self, history: List[Dict[str, Any]]) -> None:
        """``summary.csv``: one row per epoch so far, as timm's train.py writes it (its first columns: epoch,
        train_loss, eval_loss, eval_top1, eval_top5, lr) plus the EMA's top-1 / top-5, training images/s and the
        share of time spent waiting for data; empty cells where an epoch was not evaluated. Rewritten whole from
        the history (which checkpoints carry), so a resumed run's file has every epoch once."""
        if not self.enabled:
            return
        out = io.StringIO()
        writer = csv.writer(out, lineterminator='\n')
        writer.writerow([column for column, _ in SUMMARY_COLUMNS])
        for record in history:
            writer.writerow(['' if record.get(key) is None else record[key] for _, key in SUMMARY_COLUMNS])
        with self._writing('summary.csv') as path:
            write_text(path, out.getvalue())

    def epoch(self, done: int, update: int, stats: EpochStats, raw_model, metrics: Optional[Dict[str, Any]],
              ema_metrics: Optional[Dict[str, Any]], sparsity: Optional[Dict[str, Any]]) -> None:
        """The trackers' values of epoch ``done``, at its last update (``metrics`` None: not evaluated)."""
        if not self.tracking:
            return
        values = {'train/epoch': done, 'train/epoch_loss': stats.loss, 'train/images_per_s': stats.images_per_s,
                  'train/epoch_data_wait_fraction': stats.data_wait_fraction}
        if next(raw_model.parameters()).is_cuda:
            values['train/peak_gpu_mem_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
        for layer, sig in sigma_stats(raw_model).items():
            values.update({f'sigma/layer{layer:02d}/{k}': v for k, v in sig.items()})
        if metrics is not None:
            values.update({f'eval/{key}': metrics[key] for key in ('loss', 'top1', 'top5', 'images_per_s')})
            if ema_metrics is not None:
                values.update({'eval/ema_top1': ema_metrics['top1'], 'eval/ema_top5': ema_metrics['top5']})
        if sparsity is not None:
            values.update({f'sparsity/layer_{i:02d}': v for i, v in enumerate(sparsity['layers'])})
            values['sparsity/mean'] = sparsity['mean']
        self.log(values, update)

    def best(self, weights: Dict[str, Any], update: int) -> None:
        """best.safetensors (never from non-finite weights: ``state.require_finite``)."""
        if self.enabled:
            require_finite(weights, 'best weights', update)
            with self._writing(BEST_FILE) as path:
                save_weights(weights, path)

    def results(self, parts, state, metrics: Dict[str, Any], ema_metrics: Optional[Dict[str, Any]],
                sparsity_images=None, unreadable_images: int = 0,
                label_names: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
        """Export the better of the raw and EMA weights to ``<run>/model`` (``save_model``) and write
        ``<run>/results.json`` (``RunResults``) from the run's parts (``state.TrainParts``) and state
        (``state.TrainState``); returns its content as a dict (None on other processes)."""
        if not self.enabled:
            return None
        cfg, raw_model, model_ema = self.cfg, parts.raw_model, parts.model_ema
        use_ema = ema_metrics is not None and ema_metrics['top1'] > metrics['top1']
        final = model_ema.module if use_ema else raw_model
        if cfg.save_model:
            require_finite(final.state_dict(), 'final weights', state.num_updates)
            with self._writing(MODEL_DIR) as path:
                save_model_folder(final, path, _architecture_args(state.model_args), label_names)
        stats = _model_stats(raw_model)
        best = state.best
        results = RunResults(
            model=state.model_name,
            model_config=cfg.model_choice,
            model_args=state.model_args,
            data=str(cfg.data.name),
            num_classes=state.model_args['num_classes'],
            img_size=_img_size(raw_model),
            epochs=state.epochs,
            epochs_done=state.epoch,
            seed=int(cfg.seed),
            global_batch_size=state.global_batch_size,
            train_subset=cfg.train_subset,
            mixed_precision=str(parts.accelerator.mixed_precision),
            compiled=isinstance(parts.accelerator.unwrap_model(parts.model, keep_torch_compile=True),
                                torch._dynamo.eval_frame.OptimizedModule),
            params=stats['params'],
            params_attn=stats.get('params_attn'),
            params_mlp=stats.get('params_mlp'),
            params_other=stats.get('params_other'),
            gmacs=stats.get('gmacs'),
            gflops=stats.get('gflops'),
            size_mb=stats.get('size_mb'),
            top1=metrics['top1'],
            top5=metrics['top5'],
            loss=metrics['loss'],
            test_images=metrics['num_images'],
            ema_top1=ema_metrics['top1'] if ema_metrics is not None else None,
            ema_top5=ema_metrics['top5'] if ema_metrics is not None else None,
            best_top1=best['top1'] if best['epoch'] is not None else None,
            best_epoch=best['epoch'],
            best_is_ema=best['ema'],
            model_folder_weights='ema' if use_ema else 'model',
            eval_images_per_s=metrics['images_per_s'],
            train_images_per_s=state.train_images / max(state.train_time_s, 1e-9),
            data_wait_fraction=state.train_data_wait_s / max(state.train_time_s, 1e-9),
            peak_gpu_mem_mb=torch.cuda.max_memory_allocated() / 2 ** 20
            if parts.accelerator.device.type == 'cuda' else None,
            wall_time_s=state.wall_time(),
            host=socket.gethostname(),
            sigma_init=_sigma_init(raw_model),
            sigma={str(k): v for k, v in sigma_stats(final).items()},
            sparsity=(model_sparsity(final, sparsity_images, parts.accelerator.autocast)
                      if sparsity_images is not None else None),
            nonfinite_skipped=state.nonfinite_skipped,
            unreadable_images=unreadable_images,
            history=state.history,
        )
        content = dataclasses.asdict(results)
        with self._writing('results.json') as path:
            write_text(path, json.dumps(content, indent=2) + '\n')
        if self.tracking:  # TensorBoard's hparams view: the configuration with the final top-1
            finish_trackers(self.accelerator, content)
        return content

    def close(self) -> None:
        self.close_steps()
        if self.tracking:  # the trackers only: Accelerate's end_training also ends the process group, which
            for tracker in self.accelerator.trackers:  # run_training does on every process at its very end
                tracker.finish()
            self.tracking = False


def summary_line(results: Dict[str, Any], label: str, run_dir: str) -> str:
    """The line a finished run prints: test top-1 (and EMA), size, speed, time and where it is."""
    return (f"{label}: test top-1 {results['top1']:.2f}%"
            + (f" (EMA {results['ema_top1']:.2f}%)" if results['ema_top1'] is not None else '')
            + f", params {results['params'] / 1e6:.3f} M"
            + (f", GMACs {results['gmacs']:.4f}" if results['gmacs'] is not None else '')
            + f", train {results['train_images_per_s']:.0f} img/s, {results['wall_time_s']:.0f} s"
            + f" -> {run_dir}")
