"""The runs a report is made of: the run folders under the paths given, each read and checked (results.json,
config.yaml, model/), with its kind of attention, shape, learning curve and same-shape baseline.

A run folder whose results.json, config.yaml or model/ is corrupt or foreign (a truncated file, another tool's
JSON, a model folder without config.json or with truncated weights, a model timm does not know) is left out with
one warning line (summary.skip) and the report is made of the others: one damaged folder must not cost a sweep its
report.
"""
import csv
import glob
import os
from typing import Dict, List, Optional, Sequence

import torch

from vit_gka.analysis.summary import BrokenRun, read_results, skip

__all__ = ['ReportError', 'find_runs', 'load_runs', 'read_curve', 'pair_key']


class ReportError(Exception):
    """A mistake in what was asked (a path, an option): one line, exit code 2."""


def find_runs(paths: Sequence[str]) -> List[str]:
    """Run folders (holding results.json) at or under each path, in natural order (0, 1, 2, ..., 10), without
    duplicates."""
    from timm.utils import natural_key
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f'{path} is not a folder')
        found = [os.path.dirname(p) for p in glob.glob(os.path.join(path, '**', 'results.json'), recursive=True)]
        found.sort(key=lambda d: natural_key(os.path.relpath(d, path)))
        if not found:
            raise ReportError(f'no results.json under {path}')
        runs += [os.path.abspath(r) for r in found if os.path.abspath(r) not in runs]
    return runs


def _architecture(name: str, model_args: dict) -> Dict:
    """Kind (GKA / compact / VLT / baseline / other), ``attention`` (the kind, or kernel and normalisation
    of a compact kernel) and shape of a model, from a meta-device instance."""
    import timm
    from timm.models.vision_transformer import Attention

    from vit_gka.layers import GaussianKernelAttention, KernelAttention, ValueFreeAttention, VariableBandwidthAttention
    with torch.device('meta'):
        model = timm.create_model(name, **model_args)
    blocks = getattr(model, 'blocks', None)
    attn = getattr(blocks[0], 'attn', None) if blocks is not None and len(blocks) else None
    kind = ('VLT' if isinstance(attn, ValueFreeAttention) else 'baseline' if type(attn) is Attention
            else 'compact' if isinstance(attn, KernelAttention)
            else 'GKA' if isinstance(attn, (GaussianKernelAttention, KernelAttention, VariableBandwidthAttention))
            else 'other')
    attention = (f'{attn.kernel} / {attn.normalization}' if kind == 'compact' else
                 f'GKA, sigma per {attn.bandwidth}' if isinstance(attn, VariableBandwidthAttention) else kind)
    shape = None
    if attn is not None:
        fc1 = getattr(getattr(blocks[0], 'mlp', None), 'fc1', None)
        shape = (model.embed_dim, len(blocks), attn.num_heads, getattr(fc1, 'out_features', None),
                 tuple(model.patch_embed.patch_size), tuple(model.patch_embed.img_size),
                 model.patch_embed.proj.in_channels)
    return {'kind': kind, 'attention': attention, 'shape': shape}


def check_run(run: str) -> Dict:
    """The run's results.json, after checking the files the report reads: results.json (summary.read_results),
    config.yaml and model/ when there (model/ read as the report will: loading.load_model_folder); ``BrokenRun``
    naming the file and the problem otherwise."""
    from omegaconf import DictConfig, OmegaConf

    from vit_gka.errors import UserError
    from vit_gka.train.loading import load_model_folder
    res = read_results(run)
    if not isinstance(res.get('params'), (int, float)):  # Table 2's parameter count
        raise BrokenRun(f"{os.path.join(run, 'results.json')} is not a run's results (no params)")
    if res.get('model_args') is not None and not isinstance(res['model_args'], dict):
        raise BrokenRun(f"{os.path.join(run, 'results.json')} is not a run's results (model_args is no mapping)")
    config = os.path.join(run, 'config.yaml')
    if os.path.exists(config):
        try:
            cfg = OmegaConf.load(config)
        except Exception as e:  # noqa: BLE001  (yaml's and OmegaConf's errors for a corrupt file)
            raise BrokenRun(f"{config} is corrupt ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
        if not isinstance(cfg, DictConfig) or 'data' not in cfg:
            raise BrokenRun(f'{config} is not a training configuration (no data node)')
    model_dir = os.path.join(run, 'model')
    if os.path.exists(model_dir):
        try:
            load_model_folder(model_dir)
        except UserError as e:
            raise BrokenRun(' '.join(str(e).split('; ')[0].split())) from None
    return res


def load_runs(run_dirs: Sequence[str]) -> List[Dict]:
    """results.json of each run plus ``run``, ``label``, ``kind``, ``shape``, final ``top1`` and its baseline; a
    run whose files are corrupt or foreign is left out with a warning line (module docstring)."""
    rows = []
    for run in run_dirs:
        try:
            res = check_run(run)
            arch = _architecture(res['model'], res.get('model_args') or {})
        except BrokenRun as e:
            skip(run, str(e))
            continue
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # timm: an unknown model, foreign args
            skip(run, f"{os.path.join(run, 'results.json')}: timm cannot build its model {res['model']!r} "
                      f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
            continue
        res['run_dir'] = run
        res['run'] = os.path.basename(run)
        res.update(arch)
        res['label'] = res.get('model_config') or res['model']
        # top-1 of the exported model/ folder: the better of raw and EMA weights (the training job's choice)
        res['top1_raw'] = res['top1']
        if res.get('model_folder_weights') == 'ema' and res.get('ema_top1') is not None:
            res['top1'] = res['ema_top1']
        if res.get('size_mb') is None:
            res['size_mb'] = res['params'] * 4 / 2 ** 20
        sparsity = res.get('sparsity') or {}
        res['sparsity_mean'] = sparsity.get('mean')
        res['sparsity_layers'] = sparsity.get('layers')
        try:
            res['curve'] = read_curve(run)
        except (OSError, ValueError, KeyError, TypeError) as e:
            skip(run, f"{os.path.join(run, 'summary.csv')} is corrupt ({type(e).__name__}: {e})")
            continue
        rows.append(res)
    if run_dirs and not rows:
        raise ReportError(f'no readable run among {len(run_dirs)} run folders (see the warnings above)')
    labels = [r['label'] for r in rows]
    by_seed = len({(x['label'], x.get('seed')) for x in rows}) == len(rows)  # else the run folder tells them apart
    for r in rows:
        if labels.count(r['label']) > 1:
            r['label'] = f"{r['label']} s{r.get('seed')}" if by_seed else f"{r['label']} ({r['run']})"
    _pair(rows)
    return rows


def read_curve(run_dir: str) -> Optional[Dict[str, list]]:
    """Epoch, training loss and test top-1 (None where not evaluated) from the run's summary.csv; None without."""
    path = os.path.join(run_dir, 'summary.csv')
    if not os.path.isfile(path):
        return None
    with open(path, newline='') as f:
        records = list(csv.DictReader(f))
    return {'epoch': [int(r['epoch']) for r in records],
            **{key: [float(r[key]) if r.get(key) else None for r in records] for key in ('train_loss', 'eval_top1')}}


def pair_key(r: Dict):
    return (r['shape'], r.get('data'), r.get('epochs'))


def _pair(rows: List[Dict]) -> None:
    """``baseline_run``: the baseline run of the same shape, data and epochs (same seed when there is one)."""
    for r in rows:
        r['baseline_run'] = None
        if r['kind'] == 'baseline' or r['shape'] is None:
            continue
        cands = [b for b in rows if b['kind'] == 'baseline' and pair_key(b) == pair_key(r)]
        same_seed = [b for b in cands if b.get('seed') == r.get('seed')]
        if cands:
            r['baseline_run'] = (same_seed or cands)[0]['run']


