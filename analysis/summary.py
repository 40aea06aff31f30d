"""The comparison table of finished runs (their results.json), printed after a Hydra sweep.

``SweepSummary`` is a Hydra callback (conf/config.yaml, ``hydra.callbacks``): it rewrites ``runs.md`` and
``runs.csv`` in the sweep folder as each job ends (a sweep killed midway keeps the rows of its finished jobs), and
when the sweep ends prints the table: one row per job, a failed job (``failed.json``, vit_gka/train/sweep.py) as a
row with its status and, under the table, its one-line reason. Run folders are in natural order (0, 1, 2, ..., 10).
The same table for any folders holding run folders (searched recursively for results.json and failed.json)::

    python -m vit_gka.analysis.summary <folder> [<folder> ...]
    vit-gka-summary <folder> [<folder> ...]          # the same, installed

A run folder whose results.json (or failed.json) is corrupt or foreign is left out with one line on stderr,
``warning: skipping <run>: <what is wrong>; ...`` (``skip``), and the table has the other runs: one damaged file
must not cost a sweep its table.
"""
import argparse
import csv
import glob
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback

__all__ = ['collect', 'format_table', 'write_tables', 'SweepSummary', 'BrokenRun', 'read_results', 'skip', 'main',
           'cli']

PROG = 'python -m vit_gka.analysis.summary'

COLUMNS = (
    ('run', 'run'), ('model', 'model'), ('sigma_init', 'sigma_init'), ('params (M)', 'params'),
    ('GMACs', 'gmacs'), ('top-1', 'top1'), ('EMA top-1', 'ema_top1'), ('sparsity', 'sparsity'),
    ('train img/s', 'train_images_per_s'), ('wall (s)', 'wall_time_s'), ('status', 'status'),
)


def _natural_key(text: str) -> list:
    from timm.utils import natural_key
    return natural_key(text)


class BrokenRun(Exception):
    """A run folder whose files are corrupt or foreign: the message names the file and what is wrong with it."""


_skipped = set()  # warnings already given: the table and the report of one sweep read the same folders


def skip(run_dir: str, problem: str) -> None:
    """The one warning line for a run folder left out (once per folder and problem in a process)."""
    if (run_dir, problem) in _skipped:
        return
    _skipped.add((run_dir, problem))
    sys.stderr.write(f'warning: skipping {run_dir}: {problem}; the other runs are reported (rerun that job with '
                     f'resume=auto to write its files again)\n')
    sys.stderr.flush()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMBERS = ('params', 'gmacs', 'top1', 'ema_top1', 'train_images_per_s', 'wall_time_s', 'sigma_init')


def read_results(run_dir: str) -> Dict:
    """The run's results.json, checked to be a run's results (a model, a top-1, numbers where the tables want
    numbers); ``BrokenRun`` otherwise."""
    path = os.path.join(run_dir, 'results.json')
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSON's and UTF-8's decoding errors
        raise BrokenRun(f'{path} is corrupt ({_first_line(e)})') from None
    if not isinstance(res, dict) or not isinstance(res.get('model'), str) or not _number(res.get('top1')):
        raise BrokenRun(f"{path} is not a run's results (no model name and top-1)")
    bad = [k for k in NUMBERS if res.get(k) is not None and not _number(res[k])]
    sparsity = res.get('sparsity')
    if sparsity is not None and not (isinstance(sparsity, dict) and _number(sparsity.get('mean'))):
        bad.append('sparsity')
    if bad:
        raise BrokenRun(f"{path} is not a run's results ({bad[0]} is {str(res[bad[0]])[:40]!r})")
    return res


def _row(run_dir: str) -> Dict:
    from vit_gka.train.sweep import FAILED_FILE, read_failed
    try:
        failed = read_failed(run_dir)
    except (OSError, ValueError) as e:
        raise BrokenRun(f'{os.path.join(run_dir, FAILED_FILE)} is corrupt ({_first_line(e)})') from None
    if failed is None:
        return dict(read_results(run_dir), status='done')
    if not isinstance(failed, dict):
        raise BrokenRun(f"{os.path.join(run_dir, FAILED_FILE)} is not a failed job's record")
    return dict(failed, status='failed')


def collect(folders: Sequence[str]) -> List[Dict]:
    """Every results.json (``status`` done) and every failed job's failed.json (``status`` failed, ``error`` its
    one line) under ``folders``, with ``run`` = its folder relative to the folder searched, in natural order; a
    folder whose file is corrupt or foreign is left out with a warning line (``skip``)."""
    from vit_gka.train.sweep import FAILED_FILE
    rows = []
    for folder in folders:
        found = []
        for name in ('results.json', FAILED_FILE):
            found += [os.path.dirname(p) for p in glob.glob(os.path.join(folder, '**', name), recursive=True)]
        for run_dir in sorted(set(found), key=lambda d: _natural_key(os.path.relpath(d, folder))):
            try:
                row = _row(run_dir)
            except BrokenRun as e:
                skip(run_dir, str(e))
                continue
            row['run'] = os.path.relpath(run_dir, folder)
            rows.append(row)
    return rows


def finished(rows: List[Dict]) -> List[Dict]:
    """The rows of runs that wrote their results."""
    return [r for r in rows if r.get('status') != 'failed']


def failure_lines(rows: List[Dict]) -> List[str]:
    """``failed: <run>: <its one-line reason>`` for every failed job."""
    return [f"failed: {r['run']}: {r.get('error')}" for r in rows if r.get('status') == 'failed']


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
            f"{','.join(str(s) for s in g['seeds'])})" for g in groups(finished(rows)) if g['n'] > 1]


def notes(rows: List[Dict]) -> str:
    """What follows the table: the failed jobs' reasons and the seed lines."""
    return ''.join(f'\n{line}' for line in failure_lines(rows) + seed_lines(rows))


def _csv_value(key: str, value):
    if value is None:
        return ''
    if key == 'params':  # the header's unit: millions
        return value / 1e6
    return value['mean'] if isinstance(value, dict) else value


def _replace(path: str, text: str) -> None:
    """Write ``path`` whole or not at all: jobs of a parallel launcher may rewrite it at the same moment."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        f.write(text)
    os.replace(tmp, path)


def write_tables(rows: List[Dict], folder: str) -> List[str]:
    """The table as ``<folder>/runs.md`` (with the failures and the seed lines) and, with every column's number
    (and a failed job's reason in ``error``), ``<folder>/runs.csv``."""
    md, path_csv = os.path.join(folder, 'runs.md'), os.path.join(folder, 'runs.csv')
    _replace(md, format_table(rows) + '\n' + notes(rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([name for name, _ in COLUMNS] + ['error'])
    for row in rows:
        values = [_csv_value(key, row.get('model_config') or row.get('model') if key == 'model' else row.get(key))
                  for _, key in COLUMNS]
        writer.writerow(values + [row.get('error') or ''])
    _replace(path_csv, buffer.getvalue())
    return [md, path_csv]


class SweepSummary(Callback):
    """The comparison table of a ``-m`` sweep's jobs in ``runs.md`` and ``runs.csv`` of the sweep folder, rewritten
    as each job ends and printed when the sweep ends (main process only); the count of failed jobs goes to
    ``vit_gka.train.sweep``, which makes the sweep's exit status."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode
        if os.environ.get('RANK', '0') != '0' or config.hydra.mode != RunMode.MULTIRUN:
            return
        rows = collect([config.hydra.sweep.dir])
        if rows:
            write_tables(rows, config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get('RANK', '0') != '0':
            return
        from vit_gka.train.sweep import note_sweep_end
        sweep_dir = config.hydra.sweep.dir
        rows = collect([sweep_dir])
        note_sweep_end(sweep_dir, len(rows), len(rows) - len(finished(rows)))
        if rows:
            files = write_tables(rows, sweep_dir)
            print(f'\n{len(rows)} runs in {sweep_dir} ({", ".join(os.path.basename(f) for f in files)}):\n'
                  f'{format_table(rows)}' + notes(rows), flush=True)


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
    lines = failure_lines(rows) + seed_lines(rows)
    if lines:  # the failed jobs' reasons; mean +- std of every configuration that ran several seeds
        print('\n' + '\n'.join(lines))
    return 0


def cli() -> None:
    """``vit-gka-summary``: the console script."""
    sys.exit(main(prog='vit-gka-summary'))


if __name__ == '__main__':
    sys.exit(main())
