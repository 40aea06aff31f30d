"""``vit-gka-eval`` / ``python eval.py``: the Hydra entry point of evaluation (config ``conf/eval.yaml``).

One model: ``run=<run dir>`` or ``model_name=<name>`` -> ``eval.json`` (``bench.json`` with
``bench=true``). Many models in one call, as timm's validate.py does them:

    python eval.py model_name='gka*'                     # timm's wildcard: every matching name with published weights
    python eval.py 'model_name=[gka_deit_fmnist_patch7_28, deit_tiny_patch16_224.fb_in1k]'
    python eval.py run=multirun/<date>                   # every run folder of a sweep (or a list: run=[a, b])

-> each run's ``eval.json`` as for one model, and one results file of all of them: ``results.csv`` and
``results.md`` (model, params, GMACs, top-1, top-5, images/s, crop and resolution; timm's validate.py
``--results-file`` columns) in ``out`` (default: the sweep folder, else Hydra's output folder), or
``results_file=<path>.csv``. Progress: a bar on a terminal, a line every ``log_interval`` batches in a log.

This module imports no torch or timm at the top: ``--help`` and shell completion answer without them. The
evaluation itself is ``vit_gka.evaluate``.
"""
import csv
import glob
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vit_gka.errors import UserError, require_path
from vit_gka.cli import CONF_DIR, CONF_PATH, check_overrides, exit_on_user_error

__all__ = ['expand_models', 'progress_loader', 'write_results', 'main', 'cli']

WILDCARDS = '*?['  # fnmatch's, as timm.list_models takes them
# (column, key of an evaluated model's result): timm validate.py's results file, with vit-gka's compute and speed
RESULT_COLUMNS = (('model', 'label'), ('run', 'run_name'), ('weights', 'weights'), ('params (M)', 'params_m'),
                  ('GMACs', 'gmacs'), ('top1', 'top1'), ('top1_err', 'top1_err'), ('top5', 'top5'),
                  ('top5_err', 'top5_err'), ('images/s', 'images_per_s'), ('img_size', 'img_size'),
                  ('crop_pct', 'crop_pct'), ('interpolation', 'interpolation'), ('data', 'data'),
                  ('test images', 'num_images'))

log = logging.getLogger('vit_gka.eval')


def _names(value) -> List[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple, ListConfig)) else [str(value)]


def _runs_under(path: str) -> List[str]:
    """``path`` if it is a run folder (results.json), else every run folder under it, in natural order."""
    from timm.utils import natural_key
    folder = require_path(path, 'run')
    if os.path.isfile(os.path.join(folder, 'results.json')) or os.path.isfile(os.path.join(folder, 'config.yaml')):
        return [folder]
    found = [os.path.dirname(p) for p in glob.glob(os.path.join(folder, '**', 'results.json'), recursive=True)]
    if not found:
        raise UserError(f'{path} holds no training run (no results.json under it); give a run folder or a sweep '
                        f'folder')
    return sorted(found, key=lambda d: natural_key(os.path.relpath(d, folder)))


def expand_models(cfg: DictConfig) -> List[Tuple[Optional[str], Optional[str]]]:
    """(run folder, model name) of every model ``cfg`` asks for: ``run=`` a run, a sweep folder or a list of them;
    ``model_name=`` a name, a list, or a timm wildcard (its names with published weights, ``name.tag``)."""
    if cfg.run:
        return [(run, None) for path in _names(cfg.run) for run in _runs_under(path)]
    if cfg.model_name is None:
        raise UserError('give run=<run dir | sweep dir>, or model_name=<timm name | wildcard | list> (with '
                        'ckpt=<weights file> unless it has published weights)')
    out = []
    for name in _names(cfg.model_name):
        if any(c in name for c in WILDCARDS):
            import timm

            import vit_gka  # noqa: F401  (its models in timm's registry)
            matched = timm.list_models(name, pretrained=True)
            if not matched:
                raise UserError(f"model_name={name} matches no timm model with published weights; list them with "
                                f"python -c \"import timm, vit_gka; print(timm.list_models('{name}'))\"")
            out += [(None, m) for m in matched]
        else:
            out.append((None, name))
    if len(out) > 1 and cfg.ckpt is not None:
        raise UserError('ckpt= holds the weights of one model; give one model_name= with it')
    return out


def _many(cfg: DictConfig) -> bool:
    """Whether the command asks for a results table: a list, a wildcard, a sweep folder or a results_file."""
    if cfg.results_file is not None or isinstance(cfg.run, ListConfig) or isinstance(cfg.model_name, ListConfig):
        return True
    if cfg.model_name is not None and any(c in str(cfg.model_name) for c in WILDCARDS):
        return True
    return bool(cfg.run) and not os.path.isfile(os.path.join(str(cfg.run), 'results.json')) \
        and not os.path.isfile(os.path.join(str(cfg.run), 'config.yaml'))


def progress_loader(loader, desc: str, bar: bool, log_interval: int):
    """The batches of ``loader``: under a tqdm bar (``bar``), else with a log line every ``log_interval`` batches
    (a log file has no bar), as training reports its steps."""
    if bar:
        from tqdm import tqdm
        yield from tqdm(loader, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=False)
        return
    total, seen, start = len(loader), 0, time.perf_counter()
    for i, (images, targets) in enumerate(loader, 1):
        yield images, targets
        seen += len(images)
        if i % log_interval == 0 or i == total:
            log.info('%s: batch %d/%d  %.0f img/s', desc, i, total, seen / max(time.perf_counter() - start, 1e-9))


def _row(result: Dict[str, Any]) -> Dict[str, Any]:
    size = result.get('input_size') or [None]
    return dict(result, label=result['model'], run_name=os.path.basename(result['run']) if result.get('run') else None,
                params_m=result['params'] / 1e6 if result.get('params') else None,
                top1_err=100 - result['top1'], top5_err=100 - result['top5'], img_size=size[-1])


def write_results(rows: List[Dict[str, Any]], csv_path: str) -> List[str]:
    """The results of every model as ``csv_path`` and, as a Markdown table, the same name with ``.md``."""
    from vit_gka.measure.tables import markdown
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _ in RESULT_COLUMNS])
        writer.writerows([[row.get(key) for _, key in RESULT_COLUMNS] for row in rows])
    md_path = os.path.splitext(csv_path)[0] + '.md'
    with open(md_path, 'w') as f:
        f.write(markdown(rows, [(key, name) for name, key in RESULT_COLUMNS]) + '\n')
    return [csv_path, md_path]


def _data_overridden() -> bool:
    from hydra.core.hydra_config import HydraConfig
    return any(o.lstrip('+~').split('=')[0].split('.')[0] == 'data' for o in HydraConfig.get().overrides.task)


def _evaluate_one(cfg: DictConfig, run_dir: Optional[str], name: Optional[str], many: bool) -> Dict[str, Any]:
    from vit_gka import evaluate
    one = cfg.copy()
    with open_dict(one):
        one.run, one.model_name = run_dir, name
    data_cfg = evaluate.run_config(run_dir).data if run_dir is not None and not _data_overridden() else cfg.data
    bar = cfg.progress is True or (cfg.progress == 'auto' and sys.stderr.isatty())
    result = evaluate.evaluate_model(one, run_dir, data_cfg, count_flops=many,
                                     batches=lambda loader, desc: progress_loader(loader, desc, bar,
                                                                                  int(cfg.log_interval)))
    path = evaluate.write_json(one, run_dir, 'eval.json', result) if run_dir is not None or not many else None
    print(evaluate.summary_line(result) + (f' -> {path}' if path else ''), flush=True)
    return result


@hydra.main(version_base='1.3', config_path=CONF_PATH, config_name='eval')
@exit_on_user_error
def main(cfg: DictConfig) -> Optional[float]:
    """Every model ``cfg`` names (and data: a run's own unless ``data=`` is given) -> eval.json each and, for
    several, one results file; or bench.json."""
    from vit_gka import evaluate
    models = expand_models(cfg)
    if cfg.bench:
        if len(models) > 1:
            raise UserError(f'bench=true times one model against its baseline; {len(models)} were given')
        [(run, name)] = models
        rows = evaluate.benchmark(OmegaConf.merge(cfg, {'run': run, 'model_name': name}), run)
        print(f"-> {evaluate.write_json(cfg, run, 'bench.json', {'results': rows})}")
        return float(rows[0]['infer_images_per_s'])
    many = _many(cfg)
    results = [_evaluate_one(cfg, run, name, many) for run, name in models]
    if many:
        from hydra.core.hydra_config import HydraConfig
        sweep = str(cfg.run) if cfg.run and not isinstance(cfg.run, ListConfig) else None
        folder = cfg.out or (require_path(sweep, 'run') if sweep else HydraConfig.get().runtime.output_dir)
        files = write_results([_row(r) for r in results], cfg.results_file or os.path.join(folder, 'results.csv'))
        print(f"{len(results)} models -> {', '.join(files)}", flush=True)
    return float(results[0]['top1'])


def cli() -> None:
    """``vit-gka-eval`` / ``python eval.py``: the command line's overrides checked (one-line errors), then main."""
    check_overrides(CONF_DIR, 'eval')
    main()


if __name__ == '__main__':
    cli()
