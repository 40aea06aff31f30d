"""The comparison table of finished runs (their results.json), printed after a Hydra sweep.

``SweepSummary`` is a Hydra callback (conf/config.yaml, ``hydra.callbacks``): when a ``-m`` sweep ends it
prints one row per job of the sweep folder and saves the table as ``runs.md`` and ``runs.csv`` there. The same table for any folders holding run folders (searched
recursively for results.json)::

    python -m vit_gka.analysis.summary <folder> [<folder> ...]
    vit-gka-summary <folder> [<folder> ...]          # the same, installed
"""
import argparse
import csv
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback

__all__ = ['collect', 'format_table', 'write_tables', 'SweepSummary', 'main', 'cli']

PROG = 'python -m vit_gka.analysis.summary'

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


def seed_lines(rows: List[Dict]) -> List[str]:
    """``<config>: top-1 m +- s (n=3, seeds 0,1,2)`` for each configuration that ran several seeds."""
    from vit_gka.analysis.seeds import groups
    return [f"{g['name']}: top-1 {g['mean']:.2f} +- {g['std']:.2f} (n={g['n']}, seeds "
            f"{','.join(str(s) for s in g['seeds'])})" for g in groups(rows) if g['n'] > 1]


def write_tables(rows: List[Dict], folder: str) -> List[str]:
    """The table as ``<folder>/runs.md`` (with the seed lines) and, with every column's raw number,
    ``<folder>/runs.csv``."""
    md, path_csv = os.path.join(folder, 'runs.md'), os.path.join(folder, 'runs.csv')
    with open(md, 'w') as f:
        f.write(format_table(rows) + '\n' + ''.join(f'\n{line}' for line in seed_lines(rows)))
    with open(path_csv, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _ in COLUMNS])
        for row in rows:
            values = [row.get('model_config') or row.get('model') if key == 'model' else row.get(key)
                      for _, key in COLUMNS]
            writer.writerow(['' if v is None else v['mean'] if isinstance(v, dict) else v for v in values])
    return [md, path_csv]


class SweepSummary(Callback):
    """Prints the comparison table of a ``-m`` sweep's jobs when the sweep ends and saves it next to the report
    (``runs.md``, ``runs.csv`` in the sweep folder; main process only)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get('RANK', '0') != '0':
            return
        sweep_dir = config.hydra.sweep.dir
        rows = collect([sweep_dir])
        if rows:
            files = write_tables(rows, sweep_dir)
            print(f'\n{len(rows)} runs in {sweep_dir} ({", ".join(os.path.basename(f) for f in files)}):\n'
                  f'{format_table(rows)}' + ''.join(f'\n{line}' for line in seed_lines(rows)), flush=True)


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description='The comparison table (Markdown) of finished training runs: '
                                'one row per results.json found under the folders.')
    p.add_argument('folders', nargs='+', metavar='FOLDER',
                   help='a multirun folder, a run folder or any folder holding them (searched recursively)')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """The command line; returns the exit status: 0, or 2 for a usage error (argparse's message) or a folder
    that does not exist or holds no results.json (one line ``error: ...``)."""
    try:
        args = parser(prog).parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), printed by argparse
        return int(e.code or 0)
    for folder in args.folders:
        if not os.path.isdir(folder):
            sys.stderr.write(f'error: {folder} is not a folder\n')
            return 2
    rows = collect(args.folders)
    if not rows:
        sys.stderr.write(f'error: no results.json under {" ".join(args.folders)}\n')
        return 2
    print(format_table(rows))
    lines = seed_lines(rows)
    if lines:  # mean +- std of every configuration that ran several seeds
        print('\n' + '\n'.join(lines))
    return 0


def cli() -> None:
    """``vit-gka-summary``: the console script."""
    sys.exit(main(prog='vit-gka-summary'))


if __name__ == '__main__':
    sys.exit(main())
