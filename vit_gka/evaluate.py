"""Evaluate a trained model (top-1, top-5, loss, images/s) or benchmark it against its baseline.

    python eval.py run=<run dir>                                  # <run>/model/ on the run's data
    python eval.py run=<run dir> ckpt=<run dir>/checkpoints/last weights=ema
    python eval.py model_name=<timm name> ckpt=<weights file> data=<data config> [model_args={img_size: 28}]
    python eval.py run=<run dir> bench=true                       # images/s and peak memory, vs baseline

Models are built through ``timm.create_model`` only: ``local-dir:<run>/model`` or ``pretrained=True`` with
``pretrained_cfg_overlay=dict(file=<weights>)``, so the numbers are what a user of the registry gets. Writes
``eval.json`` (or ``bench.json``) into ``out`` (default: the run folder, else Hydra's output folder).
See conf/eval.yaml for every option and analysis/benchmark.py for the benchmark.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vit_gka.errors import UserError, require_path
from vit_gka.train.cli import check_overrides, exit_on_user_error
from vit_gka.train.loading import describe_load_error, load_weights

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conf')
CKPT_FILES = {'model': 'model.safetensors', 'ema': 'model_ema.safetensors'}


def run_config(run_dir: str) -> DictConfig:
    path = os.path.join(run_dir, 'config.yaml')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} is not a training run folder (no config.yaml)')
    return OmegaConf.load(path)


def run_results(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} has no results.json (an unfinished run?)')
    with open(path) as f:
        return json.load(f)


def weights_file(ckpt: str, weights: str) -> str:
    """The weights file of ``ckpt``: a file as it is, or in a checkpoint folder (``last`` / a run's
    ``checkpoints/last`` too) ``model.safetensors`` (weights=model) or ``model_ema.safetensors`` (ema)."""
    if weights not in CKPT_FILES:
        raise UserError(f"weights must be 'model' or 'ema', not '{weights}'")
    path = require_path(ckpt, 'ckpt')
    if os.path.isfile(path):
        return path
    for folder in (path, os.path.join(path, 'last'), os.path.join(path, 'checkpoints', 'last')):
        candidate = os.path.join(folder, CKPT_FILES[weights])
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f'no {CKPT_FILES[weights]} in {ckpt} (nor in its last/ or checkpoints/last/)'
                    + (' (this run kept no EMA)' if weights == 'ema' else ''))


def _set_preprocessing(model, data_cfg) -> None:
    """The data set's mean / std / crop / interpolation and the model's real input size in its pretrained
    config (as training recorded them), so ``resolve_data_config`` matches what the run evaluated with."""
    from vit_gka.data.datasets import data_preprocessing
    cfg = dict(model.pretrained_cfg)
    cfg.update(data_preprocessing(data_cfg))
    embed = getattr(model, 'patch_embed', None)
    if embed is not None:
        cfg['input_size'] = (embed.proj.in_channels, *embed.img_size)
    in_chans = cfg['input_size'][0]
    for key in ('mean', 'std'):
        if len(cfg[key]) != in_chans:
            cfg[key] = tuple([sum(cfg[key]) / len(cfg[key])] * in_chans)
    model.pretrained_cfg = cfg


def load_model(cfg: DictConfig, run_dir: Optional[str], data_cfg) -> Tuple[torch.nn.Module, str]:
    """(model, description of the weights). ``run`` alone: ``local-dir:<run>/model``; with ``ckpt``: the
    run's (or ``model=``'s) architecture with the checkpoint's weights."""
    import timm

    import vit_gka  # noqa: F401  (registers the GKA / VLT models)
    if run_dir is not None and cfg.ckpt is None:
        folder = os.path.join(run_dir, 'model')
        if not os.path.isdir(folder):
            raise UserError(f'{run_dir} has no model/ folder (train with save_model=true, or give ckpt=)')
        return timm.create_model(f'local-dir:{folder}', pretrained=True), folder
    if cfg.ckpt is None:
        raise UserError(f'model_name={cfg.model_name} needs its weights: ckpt=<weights file>')
    file = weights_file(cfg.ckpt, cfg.weights)
    load_weights(file)  # the safe read first: a truncated, foreign or code-running file stops here, in one line
    if run_dir is not None:
        res = run_results(run_dir)
        name, args = res['model'], dict(res['model_args'])
    else:
        name, args = cfg.model_name, OmegaConf.to_container(cfg.model_args, resolve=True) if cfg.model_args else {}
        if not timm.is_model(name):
            raise UserError(f"unknown timm model '{name}'")
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
    _set_preprocessing(model, data_cfg)
    return model, file


def evaluate_model(cfg: DictConfig, run_dir: Optional[str], data_cfg) -> Dict[str, Any]:
    """Top-1 / top-5 / loss / images per second of the model ``cfg`` names, on ``data_cfg``'s test split."""
    from timm.data import resolve_data_config

    from vit_gka.data.datasets import create_eval_loader
    from vit_gka.train.loop import evaluate
    model, source = load_model(cfg, run_dir, data_cfg)
    device = torch.device('cuda' if torch.cuda.is_available() and not cfg.cpu else 'cpu')
    model = model.to(device).eval()
    data_config = resolve_data_config(model=model)
    loader, num_classes = create_eval_loader(data_cfg, data_config, int(cfg.batch_size), int(cfg.workers))
    if num_classes != model.num_classes:
        raise UserError(f'the model has {model.num_classes} classes, data {data_cfg.name} has {num_classes}')
    metrics = evaluate(model, loader)
    result = {'model': model.pretrained_cfg.get('architecture') or type(model).__name__, 'weights': source,
              'run': run_dir, 'data': str(data_cfg.name), 'device': str(device),
              'input_size': list(data_config['input_size']), **metrics}
    if run_dir is not None and cfg.ckpt is None:
        res = run_results(run_dir)
        result['model'] = res['model']
        expected = res['ema_top1'] if res.get('model_folder_weights') == 'ema' else res['top1']
        result['recorded_top1'] = expected
        result['matches_recorded'] = (str(data_cfg.name) == res.get('data')
                                      and abs(metrics['top1'] - expected) < 1e-6)
    return result


def summary_line(result: Dict[str, Any]) -> str:
    line = (f"{result['model']} on {result['data']} ({result['num_images']} images): top-1 {result['top1']:.2f}%  "
            f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  {result['images_per_s']:.0f} img/s")
    if 'recorded_top1' in result:
        line += f"  (run recorded top-1 {result['recorded_top1']:.2f}%: {'same' if result['matches_recorded'] else 'DIFFERENT'})"
    return line


def _data_overridden() -> bool:
    from hydra.core.hydra_config import HydraConfig
    return any(o.lstrip('+~').split('=')[0].split('.')[0] == 'data' for o in HydraConfig.get().overrides.task)


def _output_dir(cfg: DictConfig, run_dir) -> str:
    from hydra.core.hydra_config import HydraConfig
    out = cfg.out or run_dir or HydraConfig.get().runtime.output_dir
    os.makedirs(out, exist_ok=True)
    return out


@hydra.main(version_base='1.3', config_path='conf', config_name='eval')
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    run_dir = require_path(cfg.run, 'run') if cfg.run else None
    if run_dir is None and cfg.model_name is None:
        raise UserError('give run=<run dir>, or model_name=<timm name> with ckpt=<weights file>')
    data_cfg = cfg.data
    if run_dir is not None and not _data_overridden():
        data_cfg = run_config(run_dir).data
    if cfg.bench:
        from vit_gka.analysis.benchmark import run_benchmark
        out = _output_dir(cfg, run_dir)
        results = run_benchmark(cfg, run_dir, data_cfg)
        path = os.path.join(out, 'bench.json')
        with open(path, 'w') as f:
            json.dump({'results': results}, f, indent=2)
        print(f'-> {path}')
        return float(results[0]['infer_images_per_s'])
    result = evaluate_model(cfg, run_dir, data_cfg)
    path = os.path.join(_output_dir(cfg, run_dir), 'eval.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(summary_line(result) + f' -> {path}', flush=True)
    return float(result['top1'])


def cli() -> None:
    check_overrides(CONF_DIR, 'eval')
    main()


if __name__ == '__main__':
    cli()
