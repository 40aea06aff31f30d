"""The report's tables: Table 2 (parameters, compute, accuracy, each run against its same-shape baseline) and
Table 4 (runtime), as rows (written by ``vit_gka.measure.tables``)."""
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

__all__ = ['TABLE2', 'TABLE4', 'table2', 'table4', 'load_bench']


def _pct(value, base) -> Optional[float]:
    return None if value is None or not base else 100.0 * (value - base) / base


TABLE2 = [('label', 'model'), ('attention', 'attention'), ('params_m', 'params (M)'), ('attn_m', 'attn params (M)'),
          ('mlp_m', 'MLP params (M)'), ('gmacs', 'GMACs'), ('gflops', 'GFLOPs (2 x MACs)'),
          ('size_mb', 'size (MiB, fp32)'), ('top1', 'top-1 (%)'), ('sparsity', 'sparsity'), ('baseline', 'baseline'),
          ('d_params', 'params change (%)'), ('d_gflops', 'GFLOPs change (%)'), ('d_top1', 'top-1 change (points)')]


def table2(rows: List[Dict]) -> List[Dict]:
    by_run = {r['run']: r for r in rows}
    out = []
    for r in rows:
        b = by_run.get(r['baseline_run'])
        out.append({
            'run': r['run'], 'label': r['label'], 'kind': r['kind'], 'attention': r['attention'],
            'data': r.get('data'), 'epochs': r.get('epochs'), 'sparsity': r['sparsity_mean'],
            'params_m': r['params'] / 1e6,
            'attn_m': r['params_attn'] / 1e6 if r.get('params_attn') is not None else None,
            'mlp_m': r['params_mlp'] / 1e6 if r.get('params_mlp') is not None else None,
            'gmacs': r.get('gmacs'), 'gflops': r.get('gflops'), 'size_mb': r['size_mb'], 'top1': r['top1'],
            'baseline': b['label'] if b else None,
            'd_params': _pct(r['params'], b['params']) if b else None,
            'd_gflops': _pct(r.get('gflops'), b.get('gflops')) if b else None,
            'd_top1': r['top1'] - b['top1'] if b else None,
        })
    return out


BENCH_KEYS = ('infer_images_per_s', 'train_images_per_s', 'infer_peak_mem_mb', 'train_peak_mem_mb')
TABLE4 = [('label', 'model'), ('source', 'source'), ('batch_size', 'batch'), ('infer_images_per_s', 'inference img/s'),
          ('train_images_per_s', 'training img/s'), ('infer_peak_mem_mb', 'inference peak MiB'),
          ('train_peak_mem_mb', 'training peak MiB'), ('baseline', 'baseline'), ('d_infer', 'inference change (%)'),
          ('d_train', 'training change (%)'), ('d_train_mem', 'training memory change (%)')]


def load_bench(paths: Sequence[str]) -> List[Dict]:
    """Rows of every bench.json (eval.py bench=true) under ``paths``."""
    rows = []
    for path in paths:
        for file in sorted(glob.glob(os.path.join(path, '**', 'bench.json'), recursive=True)):
            with open(file) as f:
                rows += [dict(r, source=os.path.relpath(file, path)) for r in json.load(f)['results']]
    return rows


def table4(rows: List[Dict], bench: List[Dict]) -> List[Dict]:
    """Runtime table: benchmark rows (paired by eval.py) if any, else the runs' own training / eval rates."""
    if not bench:
        bench = [{'label': r['label'], 'source': f"{r['run']}/results.json", 'batch_size': r.get('global_batch_size'),
                  'infer_images_per_s': r.get('eval_images_per_s'), 'train_images_per_s': r.get('train_images_per_s'),
                  'infer_peak_mem_mb': None, 'train_peak_mem_mb': None,
                  'baseline': next((b['label'] for b in rows if b['run'] == r['baseline_run']), None)} for r in rows]
    by_label = {(b['label'], b['source'] if 'results.json' not in b['source'] else ''): b for b in bench}
    out = []
    for row in bench:
        b = by_label.get((row.get('baseline'), row['source'] if 'results.json' not in row['source'] else ''))
        out.append({**{k: row.get(k) for k, _ in TABLE4}, **({
            'd_infer': _pct(row.get('infer_images_per_s'), b.get('infer_images_per_s')),
            'd_train': _pct(row.get('train_images_per_s'), b.get('train_images_per_s')),
            'd_train_mem': _pct(row.get('train_peak_mem_mb'), b.get('train_peak_mem_mb')),
        } if b else {})})
    return out
