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
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from vit_gka.cli import UserError, check_overrides, exit_on_user_error, require_path  # noqa: E402


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
    from analysis import evaluation
    run_dir = require_path(cfg.run, 'run') if cfg.run else None
    if run_dir is None and cfg.model_name is None:
        raise UserError('give run=<run dir>, or model_name=<timm name> with ckpt=<weights file>')
    data_cfg = cfg.data
    if run_dir is not None and not _data_overridden():
        data_cfg = evaluation.run_config(run_dir).data
    if cfg.bench:
        from analysis.benchmark import run_benchmark
        out = _output_dir(cfg, run_dir)
        results = run_benchmark(cfg, run_dir, data_cfg)
        path = os.path.join(out, 'bench.json')
        with open(path, 'w') as f:
            json.dump({'results': results}, f, indent=2)
        print(f'-> {path}')
        return float(results[0]['infer_images_per_s'])
    result = evaluation.evaluate_model(cfg, run_dir, data_cfg)
    path = os.path.join(_output_dir(cfg, run_dir), 'eval.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(evaluation.summary_line(result) + f' -> {path}', flush=True)
    return float(result['top1'])


if __name__ == '__main__':
    check_overrides(os.path.join(ROOT, 'conf'), 'eval')
    main()
