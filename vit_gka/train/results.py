"""What a finished run records: the final model folder and ``results.json`` (see ``RESULT_KEYS``)."""
import json
import logging
import os
from typing import Any, Dict, Optional

from vit_gka.analysis.flops import model_stats
from vit_gka.train.checkpoint import save_model_folder, write_text
from vit_gka.train.loop import sigma_stats
from vit_gka.layers.compact import model_sparsity

log = logging.getLogger('vit_gka.train')

RESULT_KEYS = ('model', 'model_args', 'data', 'num_classes', 'img_size', 'epochs', 'seed', 'global_batch_size',
               'params', 'params_attn', 'params_mlp', 'gmacs', 'gflops', 'top1', 'top5', 'ema_top1', 'ema_top5',
               'loss', 'train_images_per_s', 'wall_time_s', 'sigma_init', 'sparsity')


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


def write_results(cfg, run_dir, raw_model, model_ema, model_name, model_args, num_classes, num_epochs,
                  global_batch, metrics, ema_metrics, best, history, train_rate, wall_time, stop_epoch,
                  sparsity_images=None, autocast=None, faults=None) -> Dict[str, Any]:
    """Export the better of the raw and EMA weights to ``<run>/model`` (``save_model``) and write
    ``<run>/results.json``; returns its content."""
    use_ema = ema_metrics is not None and ema_metrics['top1'] > metrics['top1']
    final = model_ema.module if use_ema else raw_model
    if cfg.get('save_model', True):
        save_model_folder(final, os.path.join(run_dir, 'model'))
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
        # of the model/ weights on the first SPARSITY_IMAGES test images (trainer.py); None without kernel attention
        'sparsity': model_sparsity(final, sparsity_images, autocast) if sparsity_images is not None else None,
        **(faults or {}),  # nonfinite_skipped, unreadable_images (faults.py, data.py)
        'history': history,
    }
    write_text(os.path.join(run_dir, 'results.json'), json.dumps(results, indent=2) + '\n')
    return results


def summary_line(results: Dict[str, Any], label: str, run_dir: str) -> str:
    """The line a finished run prints: test top-1 (and EMA), size, speed, time and where it is."""
    return (f"{label}: test top-1 {results['top1']:.2f}%"
            + (f" (EMA {results['ema_top1']:.2f}%)" if results['ema_top1'] is not None else '')
            + f", params {results['params'] / 1e6:.3f} M"
            + (f", GMACs {results['gmacs']:.4f}" if results['gmacs'] is not None else '')
            + f", train {results['train_images_per_s']:.0f} img/s, {results['wall_time_s']:.0f} s"
            + f" -> {run_dir}")
