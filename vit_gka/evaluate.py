"""Evaluate a trained model (top-1, top-5, loss, images/s) or benchmark it against its baseline; the
``python eval.py`` / ``vit-gka-eval`` command, in the manner of timm's validate.py.

    python eval.py run=<run dir>                                  # <run>/model/ on the run's data
    python eval.py run=<run dir> ckpt=<run dir>/checkpoints/last weights=ema
    python eval.py model_name=<timm name> ckpt=<weights file> data=<data config> [model_args={img_size: 28}]
    python eval.py model_name=gka_deit_fmnist_patch7_28                # the shipped pretrained GKA
    python eval.py run=<run dir> bench=true                       # images/s and peak memory, vs baseline

The whole of it: the model through ``timm.create_model`` only (``local-dir:<run>/model``, or
``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=<weights>)``, so the numbers are what a user of the
registry gets) -> the data set's test split with the model's own preprocessing (``resolve_data_config``) ->
top-1 / top-5 / loss / images/s, under the autocast the run used (a bf16 run: bf16; ``mixed_precision``) ->
``eval.json`` (``bench.json`` with ``bench=true``) in ``out`` (default: the run folder, else Hydra's output
folder). See conf/eval.yaml for every option and analysis/benchmark.py for the benchmark. Mistakes end in one
line ``error: ...``, exit status 2 (vit_gka/cli.py). The command itself (Hydra, several models in one call,
the results file, progress) is ``vit_gka/eval_main.py``.
"""
import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from vit_gka.measure.benchmark import benchmark_models, with_baseline
from vit_gka.errors import UserError, require_path
from vit_gka.train.checkpoint import EMA_FILE, MODEL_DIR, MODEL_FILE
from vit_gka.train.loading import describe_load_error, find_folder, load_model_folder, load_weights
from vit_gka.train.recipe import record_preprocessing
from vit_gka.train.choices import EVAL_CHOICES, check_choice

__all__ = ['run_config', 'run_results', 'weights_file', 'model_spec', 'load_model', 'eval_autocast', 'evaluate_model',
           'compare_to_run', 'benchmark', 'summary_line', 'write_json']

CKPT_FILES = {'model': MODEL_FILE, 'ema': EMA_FILE}  # weights= -> its file in a checkpoint folder
# mixed_precision= -> autocast dtype (fp8 runs were evaluated under Accelerate's bf16 autocast)
# top-1 points by which eval.py may differ from a bf16 / fp16 / compiled run's own evaluation (rounding)
ROUNDING_TOLERANCE = 0.5
AUTOCAST_DTYPES = {'no': None, 'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp8': torch.bfloat16}

# ------------------------------------------------------------------------------------------- the run folder


def run_config(run_dir: str) -> DictConfig:
    """The run's resolved training configuration (``<run>/config.yaml``)."""
    path = os.path.join(run_dir, 'config.yaml')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} is not a training run folder (no config.yaml)')
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001  (yaml's and OmegaConf's errors for a corrupt file)
        raise UserError(f'{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); give '
                        f'data=<data config> and model_name= with ckpt=, or another run') from e
    if not isinstance(cfg, DictConfig) or 'data' not in cfg:
        raise UserError(f'{path} is not a training configuration (no data node); give another run')
    return cfg


def run_results(run_dir: str) -> Dict[str, Any]:
    """What the run recorded (``<run>/results.json``): its model, arguments, data and top-1."""
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} has no results.json (an unfinished run?)')
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is corrupt ({type(e).__name__}: {e}); rerun the training with resume=auto '
                        f'hydra.run.dir={run_dir} to write it again') from e
    missing = [k for k in ('model', 'model_args', 'top1') if not isinstance(res, dict) or k not in res]
    if missing:
        raise UserError(f'{path} is not a run\'s results (no {", ".join(missing)}); rerun the training with '
                        f'resume=auto hydra.run.dir={run_dir} to write it again')
    return res


def weights_file(ckpt: str, weights: str) -> str:
    """The weights file of ``ckpt``: a file as it is, or in a checkpoint folder (``last`` / a run's
    ``checkpoints/last`` too) ``model.safetensors`` (weights=model) or ``model_ema.safetensors`` (ema)."""
    check_choice('weights', weights, EVAL_CHOICES)
    path = require_path(ckpt, 'ckpt')
    if os.path.isfile(path):
        return path
    folder = find_folder(path, (CKPT_FILES[weights],))
    if folder is not None:
        return os.path.join(folder, CKPT_FILES[weights])
    raise UserError(f'no {CKPT_FILES[weights]} in {ckpt} (nor in its last/ or checkpoints/last/)'
                    + (' (this run kept no EMA)' if weights == 'ema' else ''))

# --------------------------------------------------------------------------------- the model, through timm


def model_spec(cfg: DictConfig, run_dir: Optional[str]) -> Tuple[str, Dict[str, Any], str]:
    """(timm name, ``create_model`` arguments, label) of the architecture: the run's recorded one, else
    ``model_name=`` with ``model_args=``."""
    if run_dir is not None:
        res = run_results(run_dir)
        return res['model'], dict(res['model_args']), res.get('model_config') or res['model']
    name = cfg.model_name
    args = OmegaConf.to_container(cfg.model_args, resolve=True) if cfg.model_args else {}
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'")
    return name, args, name


def load_model(cfg: DictConfig, run_dir: Optional[str], data_cfg) -> Tuple[torch.nn.Module, str]:
    """(model, where its weights came from). ``run`` alone: ``<run>/model`` (loading.load_model_folder: the model
    ``local-dir:<run>/model`` gives, safetensors only, a pickle there refused); with ``ckpt``: the run's
    (or ``model_name=``'s) architecture with the checkpoint's weights, read safely first."""
    if run_dir is not None and cfg.ckpt is None:
        folder = os.path.join(run_dir, MODEL_DIR)
        if not os.path.isdir(folder):
            raise UserError(f'{run_dir} has no model/ folder (train with save_model=true, or give ckpt=)')
        return load_model_folder(folder), folder
    if cfg.ckpt is None:
        return _published_model(cfg)
    file = weights_file(cfg.ckpt, cfg.weights)
    load_weights(file)  # the safe read first: a truncated, foreign or code-running file stops here, in one line
    name, args, _ = model_spec(cfg, run_dir)
    num_classes = args.pop('num_classes', None) or int(data_cfg.get('num_classes') or 0) or None
    if num_classes is None:
        raise UserError('set the number of classes: model_args.num_classes=<N> or a data config with num_classes')
    args.setdefault('in_chans', int(data_cfg.in_chans) if data_cfg.get('in_chans') else 3)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=file, num_classes=num_classes), **args)
    except TypeError as e:  # a bad model argument
        raise UserError(f'cannot load {file} into {name} {args}: {str(e).splitlines()[0]}') from e
    except RuntimeError as e:  # timm's strict load_state_dict: weights of another architecture / classes
        raise UserError(f'cannot load {file} into {name} {args}: {describe_load_error(e)}; give a checkpoint '
                        f'of this model and data set') from e
    record_preprocessing(model, data_cfg)  # as training recorded it: resolve_data_config gives what the run used
    return model, file


def _published_model(cfg: DictConfig) -> Tuple[torch.nn.Module, str]:
    """``model_name=<name>[.<tag>]`` without ``ckpt``: the weights its pretrained config names (the shipped
    ``gka_deit_fmnist_patch7_28``, or any timm model with published weights), with their own preprocessing."""
    name, args, _ = model_spec(cfg, None)
    try:
        model = timm.create_model(name, pretrained=True, **args)
    except RuntimeError as e:  # no published weights (_builder._require_weights, timm's own), or a failed load
        raise UserError(f'model_name={name}: {str(e).splitlines()[0]}; or give its weights: ckpt=<weights '
                        f'file>') from e
    source = model.pretrained_cfg.get('file') or model.pretrained_cfg.get('hf_hub_id') or \
        model.pretrained_cfg.get('url')
    return model, f"{model.pretrained_cfg['architecture']}.{model.pretrained_cfg['tag']} ({source})"


def _device(cfg: DictConfig) -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() and not cfg.cpu else 'cpu')


def eval_autocast(cfg: DictConfig, run_dir: Optional[str], device: torch.device) -> Tuple[Optional[Callable], str]:
    """(autocast context-manager factory or None, its name) for ``mixed_precision``: ``auto`` = the precision
    the run trained and evaluated with (results.json's ``mixed_precision``; fp32 for a run that does not record it
    and without ``run=``), so that the run's own numbers are reproduced."""
    value = check_choice('mixed_precision', str(cfg.mixed_precision), EVAL_CHOICES)
    if value == 'auto':
        value = str(run_results(run_dir).get('mixed_precision') or 'no') if run_dir is not None else 'no'
    dtype = AUTOCAST_DTYPES.get(value)
    if dtype is None:
        return None, 'no'
    name = 'fp16' if dtype == torch.float16 else 'bf16'
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), name

# ----------------------------------------------------------------------------------- evaluate / benchmark


def evaluate_model(cfg: DictConfig, run_dir: Optional[str], data_cfg, count_flops: bool = False,
                   batches: Optional[Callable] = None) -> Dict[str, Any]:
    """Top-1 / top-5 / loss / images per second of the model ``cfg`` names, on ``data_cfg``'s test split, with its
    parameter count, crop and interpolation (and GMACs with ``count_flops``); for a run's own model/ also the top-1
    the run recorded and whether this matches it. ``batches(loader, desc)``: the loader's batches as the caller
    shows progress (eval_main.progress_loader)."""
    from timm.data import resolve_data_config

    from vit_gka.data.loaders import create_eval_loader
    from vit_gka.train.loop import evaluate
    device = _device(cfg)
    autocast, precision = eval_autocast(cfg, run_dir, device)
    model, source = load_model(cfg, run_dir, data_cfg)
    model = model.to(device).eval()
    data_config = resolve_data_config(model=model)
    loader, num_classes = create_eval_loader(data_cfg, data_config, int(cfg.batch_size), cfg.workers,
                                             on_cpu=device.type == 'cpu')
    if num_classes != model.num_classes:
        raise UserError(f'the model has {model.num_classes} classes, data {data_cfg.name} has {num_classes}')
    label = model.pretrained_cfg.get('architecture') or type(model).__name__
    metrics = evaluate(model, batches(loader, label) if batches is not None else loader, autocast=autocast)
    result = {'model': label, 'weights': source,
              'run': run_dir, 'data': str(data_cfg.name), 'device': str(device), 'mixed_precision': precision,
              'input_size': list(data_config['input_size']), 'crop_pct': data_config.get('crop_pct'),
              'interpolation': data_config.get('interpolation'), 'params': sum(p.numel() for p in model.parameters()),
              **metrics}
    if count_flops:
        from vit_gka.measure.flops import model_stats
        result['gmacs'] = model_stats(model)['gmacs']
    if run_dir is not None and cfg.ckpt is None:
        res = run_results(run_dir)
        result['model'] = res['model']
        result.update(compare_to_run(res, str(data_cfg.name), metrics['top1']))
    return result


def compare_to_run(res: Dict[str, Any], data: str, top1: float) -> Dict[str, Any]:
    """``recorded_top1`` (of the weights model/ holds), ``top1_tolerance`` and ``matches_recorded`` for a top-1
    measured on ``data``, against the run's results.json ``res``. The same number, to the image, unless the run
    evaluated under bf16 / fp16 autocast or torch.compile: their kernels round differently from eval.py's eager
    ones, and a few borderline images may flip (``ROUNDING_TOLERANCE`` points)."""
    expected = res['ema_top1'] if res.get('model_folder_weights') == 'ema' else res['top1']
    exact = res.get('mixed_precision', 'no') == 'no' and not res.get('compiled', False)
    tolerance = 0.0 if exact else ROUNDING_TOLERANCE
    return {'recorded_top1': expected, 'top1_tolerance': tolerance,
            'matches_recorded': data == res.get('data') and abs(top1 - expected) <= tolerance + 1e-6}


def benchmark(cfg: DictConfig, run_dir: Optional[str]) -> List[Dict[str, Any]]:
    """``bench=true``: images/s and peak memory of the model ``cfg`` names (random weights, its shape) and of
    ``bench_cfg.baseline``, interleaved (``vit_gka.measure.benchmark.benchmark_models``)."""
    name, args, label = model_spec(cfg, run_dir)
    args.pop('drop_path_rate', None)
    bc = cfg.bench_cfg
    device = _device(cfg)
    amp = device.type == 'cuda' if str(bc.amp) == 'auto' else bool(bc.amp)
    return benchmark_models(with_baseline(label, name, args, bc.baseline), device, batch_size=int(bc.batch_size),
                            warmup=int(bc.warmup), steps=int(bc.steps), rounds=int(bc.rounds), amp=amp,
                            train=bool(bc.train), compile=bool(bc.compile))


def summary_line(result: Dict[str, Any]) -> str:
    line = (f"{result['model']} on {result['data']} ({result['num_images']} images): top-1 {result['top1']:.2f}%  "
            f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  {result['images_per_s']:.0f} img/s")
    if 'recorded_top1' in result:
        same = 'same' if result['top1'] == result['recorded_top1'] else f"within {result['top1_tolerance']:.1f} points"
        line += f"  (run recorded top-1 {result['recorded_top1']:.2f}%: {same if result['matches_recorded'] else 'DIFFERENT'})"
    return line

# ------------------------------------------------------------------------------------------ the record


def write_json(cfg: DictConfig, run_dir: Optional[str], name: str, obj: Any) -> str:
    """``obj`` as ``<out>/<name>`` (``out``: ``cfg.out``, else the run folder, else Hydra's output folder)."""
    from hydra.core.hydra_config import HydraConfig

    from vit_gka.train.checkpoint import write_failed, write_text
    out = cfg.out or run_dir or HydraConfig.get().runtime.output_dir
    path = os.path.join(out, name)
    try:  # atomic: a full or read-only disk leaves the old file (or none), and one line, exit 74
        os.makedirs(out, exist_ok=True)
        write_text(path, json.dumps(obj, indent=2))
    except OSError as e:
        raise write_failed(path, e, 'make room (or fix the disk), then run the same command again') from e
    return path
