"""Rows of measurements as Markdown (tabulate, GitHub style) and CSV: one cell format for every table the suite
writes, eval.py's results and the report's Tables 2 and 4."""
import csv
from typing import Dict, List

from tabulate import tabulate

__all__ = ['markdown', 'write_csv']


def _cell(key: str, value) -> str:
    if value is None:
        return '-'
    if not isinstance(value, float):
        return str(value)
    if key.startswith('d_'):
        return f'{value:+.2f}'
    if key in ('gmacs', 'gflops'):
        return f'{value:.4g}'
    if key == 'sparsity':
        return f'{value:.3f}'
    if key.endswith('_per_s') or key.endswith('_mb') and key != 'size_mb':
        return f'{value:.0f}'
    return f'{value:.2f}'


def markdown(rows: List[Dict], columns) -> str:
    body = [[_cell(k, r.get(k)) for k, _ in columns] for r in rows]
    align = ['left' if k in ('label', 'kind', 'attention', 'baseline', 'source') else 'right' for k, _ in columns]
    return tabulate(body, headers=[h for _, h in columns], tablefmt='github', disable_numparse=True, colalign=align)


def write_csv(rows: List[Dict], columns, path: str) -> str:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([k for k, _ in columns])
        writer.writerows([[r.get(k) for k, _ in columns] for r in rows])
    return path
