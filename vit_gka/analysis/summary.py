"""The comparison table of finished runs (their results.json), printed after a Hydra sweep.

``SweepSummary`` is a Hydra callback (conf/config.yaml, ``hydra.callbacks``): when a ``-m`` sweep ends it
prints one row per job of the sweep folder. ``python -m vit_gka.summary <folder> [...]`` prints the same
table for any folders holding run folders (searched recursively for results.json).
"""
import glob
import json
import os
import sys
from typing import Dict, List, Sequence

from hydra.experimental.callback import Callback

__all__ = ['collect', 'format_table', 'SweepSummary']

COLUMNS = (
    ('run', 'run'), ('model', 'model'), ('sigma_init', 'sigma_init'), ('params (M)', 'params'),
    ('GMACs', 'gmacs'), ('top-1', 'top1'), ('EMA top-1', 'ema_top1'), ('sparsity', 'sparsity'),
    ('train img/s', 'train_images_per_s'), ('wall (s)', 'wall_time_s'),
)


def collect(folders: Sequence[str]) -> List[Dict]:
    """Every results.json under ``folders``, with ``run`` = its folder relative to the folder searched."""
    rows = []
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, '**', 'results.json'), recursive=True)):
            with open(path) as f:
                row = json.load(f)
            row['run'] = os.path.relpath(os.path.dirname(path), folder)
            rows.append(row)
    return rows


def _cell(key: str, value) -> str:
    if value is None:
        return '-'
    if key == 'params':
        return f'{value / 1e6:.3f}'
    if key == 'gmacs':
        return f'{value:.4f}'
    if key in ('top1', 'ema_top1'):
        return f'{value:.2f}'
    if key in ('train_images_per_s', 'wall_time_s'):
        return f'{value:.0f}'
    if key == 'sparsity':  # results.json: {'mean': ..., 'layers': [...]} for kernel attention, else null
        return f"{value['mean']:.3f}"
    if key == 'sigma_init':
        return f'{value:.3g}'
    if key == 'model':
        return str(value)
    return str(value)


def format_table(rows: List[Dict]) -> str:
    """A Markdown table of ``rows`` (results.json dicts); ``model`` shows the model config's name."""
    header = [name for name, _ in COLUMNS]
    body = []
    for row in rows:
        cells = []
        for _, key in COLUMNS:
            value = row.get('model_config') or row.get('model') if key == 'model' else row.get(key)
            cells.append(_cell(key, value))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ['| ' + ' | '.join(h.ljust(w) for h, w in zip(header, widths)) + ' |',
             '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    lines += ['| ' + ' | '.join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              + ' |' for r in body]
    return '\n'.join(lines)


class SweepSummary(Callback):
    """Prints the comparison table of a ``-m`` sweep's jobs when the sweep ends (main process only)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get('RANK', '0') != '0':
            return
        sweep_dir = config.hydra.sweep.dir
        rows = collect([sweep_dir])
        if rows:
            print(f'\n{len(rows)} runs in {sweep_dir}:\n{format_table(rows)}', flush=True)


def main(argv: Sequence[str]) -> int:
    if not argv:
        sys.stderr.write('usage: python -m vit_gka.summary <folder> [<folder> ...]\n')
        return 2
    rows = collect(argv)
    if not rows:
        sys.stderr.write(f'error: no results.json under {" ".join(argv)}\n')
        return 1
    print(format_table(rows))
    return 0


if __name__ == '__main__':
    raise SystemExit(main(sys.argv[1:]))
