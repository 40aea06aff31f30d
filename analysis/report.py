"""Paper-style report of a sweep: tables (Markdown + CSV) and PNG plots from finished run folders.

    python -m vit_gka.analysis.report <multirun-folder | run-dir> [...] [--out DIR] [--images N]
    vit-gka-report <multirun-folder | run-dir> [...] [--out DIR] [--images N]      # the same, installed

A run folder holds ``results.json`` (train.py, vit_gka/train/), ``model/`` (timm save_for_hf) and
``config.yaml``; folders are searched recursively. ``bench.json`` files (``eval.py bench=true``) found there
give the runtime table. Written to ``--out`` (default ``<folder>/report`` for one folder, else ``report``):

* ``report.md``: Table 2 (paper style): params total / attention / MLP (M), GMACs, GFLOPs (= 2 x MACs),
  size (MiB, fp32), top-1 of the exported model, attention sparsity, and the change in params %, GFLOPs % and
  top-1 (points) against the DeiT baseline of the same shape (embed dim, depth, heads, MLP width, patch,
  input size, in channels; same data and epochs); Table 4: inference and training images/s and peak memory
  with change % (from bench.json), else measured here, each pair interleaved, when the jobs ran on this machine
  (analysis/runtime.py); the learned-bandwidth summary; the attention sparsity per layer; the jobs of the sweep
  that failed, with their one-line reasons (failed.json, vit_gka/train/sweep.py).
* ``table2.csv``, ``table4.csv``, ``table_seeds.csv`` (when a configuration ran several seeds: mean +- std, n,
  and the change against the baseline with a 95% interval, paired by seed: analysis/seeds.py);
  ``top1_vs_gflops.png`` (error bars for several seeds), ``params_by_part.png``, ``learning_curves.png``
  (training loss and test top-1 per epoch of every run, from its summary.csv; seeds of one configuration as a
  band),
  ``sigma_<run>.png`` (learned bandwidth per layer x head of each GKA / compact-kernel run),
  ``token_sigma_<run>.png`` (data-dependent bandwidths, ``gka_q`` / ``gka_k``: sigma_i over the patch grid of a few
  test images, per layer; the report also gives its range and spread over tokens),
  ``attention_distance_<run>.png`` (mean attention distance per head and layer, in patches, on N real test
  images, next to the baseline's) and ``sparsity.png`` (per-layer attention sparsity of every run that has
  it, when a compact-kernel run is among them).

Kinds of attention: ``GKA`` (Gaussian), ``compact`` (``vit_gka.KernelAttention`` with an Epanechnikov,
biweight or triweight kernel; the ``attention`` column names kernel and normalisation), ``VLT``,
``baseline`` (timm's DeiT ``Attention``), ``other``. Sparsity is ``results.json``'s ``sparsity``: the fraction
of exact zeros of the attention weights per layer, measured by training on the first test images with the
final weights. GKA runs have it too (float32 underflow only: essentially 0); DeiT and VLT have none ("-").

Hydra: every ``python train.py -m ...`` sweep ends with this report, in ``<sweep dir>/report``
(``ReportCallback``, ``hydra.callbacks.report`` in conf/config.yaml; ``hydra.callbacks.report.num_images=<n>``).
``vit-gka-report <sweep folder>`` rebuilds it later from the run folders alone. A run folder with a corrupt or
foreign file is left out with one warning line (analysis/runs.py); a stop signal while the report is made stops
it at once in one line, exit status 75, with no file left half-written (``build_report``, ``stopping_on_signals``).
"""
import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from hydra.experimental.callback import Callback

from vit_gka.analysis import seeds
from vit_gka.analysis.runtime import runtime_rows
from vit_gka.analysis.runs import ReportError, find_runs, load_runs
from vit_gka.analysis.runs import pair_key as _pair_key
from vit_gka.analysis.summary import collect
from vit_gka.analysis.tables import TABLE2, TABLE4, table2, table4
from vit_gka.measure.tables import markdown, write_csv
from vit_gka.train.faults import pause_in_report

log = logging.getLogger('vit_gka.analysis.report')

PROG = 'python -m vit_gka.analysis.report'


# ------------------------------------------------------------------------------------------- models
def load_model(run_dir: str):
    """The run's exported model, the one ``timm.create_model('local-dir:<run>/model', pretrained=True)`` gives, read
    from config.json and model.safetensors only: a pickle there is refused (loading.load_model_folder)."""
    import importlib

    from vit_gka.train.loading import load_model_folder
    importlib.import_module('vit_gka.models')  # registers the GKA, VLT and compact-kernel families
    return load_model_folder(os.path.join(run_dir, 'model')).eval()


def test_images(run_dir: str, model, num_images: int) -> torch.Tensor:
    """The first ``num_images`` test images of the run's data set, preprocessed for ``model``."""
    from omegaconf import OmegaConf
    from timm.data import resolve_data_config

    from vit_gka.data.loaders import create_eval_loader
    data_cfg = OmegaConf.load(os.path.join(run_dir, 'config.yaml')).data
    loader, _ = create_eval_loader(data_cfg, resolve_data_config(model=model), batch_size=num_images, num_workers=0)
    images, _ = next(iter(loader))
    return images


def attention_figures(rows: List[Dict], out: str, num_images: int) -> List[str]:
    """Bandwidth heatmap and attention-distance plot of every GKA and compact-kernel run (next to its
    baseline); paths written."""
    from vit_gka.analysis import plots
    from vit_gka.measure.attention import attention_modules, mean_attention_distance, sigma_table, token_bandwidths
    by_run = {r['run']: r for r in rows}
    written = []
    for r in [r for r in rows if r['kind'] in ('GKA', 'compact')]:
        if not os.path.isdir(os.path.join(r['run_dir'], 'model')):
            log.warning('%s has no model/ folder: no sigma or attention-distance plot', r['run'])
            continue
        model = load_model(r['run_dir'])
        sigma = sigma_table(model)
        r['sigma_table'] = sigma.tolist()
        written.append(plots.sigma_heatmap(sigma.numpy(), r['label'], os.path.join(out, f"sigma_{r['run']}.png"),
                                           r.get('sigma_init'), 'h' if r['kind'] == 'compact' else 'sigma'))
        try:
            images = test_images(r['run_dir'], model, num_images)
        except Exception as e:  # data not on this machine (e.g. ImageNet elsewhere): plot what is possible
            log.warning('%s: no test images for the attention distance (%s)', r['run'], e)
            continue
        tokens = token_bandwidths(model, images)
        if tokens is not None:  # data-dependent bandwidths: how far sigma_i spreads over tokens, and where
            log_sigma = tokens.log()
            r['token_sigma_spread'] = log_sigma.std(dim=(1, 3)).mean(1).tolist()  # per layer
            r['token_sigma_range'] = [float(tokens.min()), float(tokens.max())]
            written.append(plots.token_sigma_maps(
                images.cpu().numpy(), tokens.numpy(), model.patch_embed.grid_size, model.num_prefix_tokens,
                r['label'], os.path.join(out, f"token_sigma_{r['run']}.png"), r['attention'].rsplit(' ', 1)[-1]))
        panels = [{'label': r['label'], 'distance': mean_attention_distance(model, images).numpy()}]
        base = by_run.get(r['baseline_run'])
        if base is not None and os.path.isdir(os.path.join(base['run_dir'], 'model')):
            base_model = load_model(base['run_dir'])
            if attention_modules(base_model):
                panels.append({'label': base['label'], 'distance': mean_attention_distance(base_model, images).numpy()})
        r['attention_distance'] = panels[0]['distance'].tolist()
        written.append(plots.attention_distance(panels, os.path.join(out, f"attention_distance_{r['run']}.png"),
                                                len(images)))
    return written


# ------------------------------------------------------------------------------------------- report
SEED_COLUMNS = [('label', 'model'), ('n', 'n'), ('seeds', 'seeds'), ('top1_mean', 'top-1 mean'),
                ('top1_std', 'top-1 std'), ('baseline', 'baseline'), ('d_top1', 'change (points)'),
                ('ci_lo', '95% low'), ('ci_hi', '95% high'), ('pairing', 'interval')]


def seed_groups(rows: List[Dict]) -> List[Dict]:
    """``seeds.groups`` of the report's rows: one per configuration and shape / data / epochs."""
    return seeds.groups(rows, key=lambda r: (seeds.config_name(r), _pair_key(r)))


def seed_table(rows: List[Dict]) -> List[Dict]:
    """The Seeds table: every configuration, when any of them ran more than one seed; [] otherwise."""
    found = seed_groups(rows)
    if all(g['n'] < 2 for g in found):
        return []
    out = []
    for g in found:
        first = g['runs'][0]
        base = next((b for b in found if b['runs'][0]['kind'] == 'baseline' and first['kind'] != 'baseline'
                     and _pair_key(b['runs'][0]) == _pair_key(first)), None)
        row = {'label': g['name'], 'n': g['n'], 'seeds': ','.join(str(s) for s in g['seeds']),
               'top1_mean': g['mean'], 'top1_std': g['std'], 'baseline': base['name'] if base else None}
        if base is not None:
            c = seeds.compare(g['runs'], base['runs'])
            row.update(d_top1=c['diff'], ci_lo=c['lo'], ci_hi=c['hi'], pairing=c['pairing'])
        out.append(row)
    return out


TMP_PREFIX = '.report.tmp-'


def build_report(paths: Sequence[str], out: Optional[str] = None, num_images: int = 64) -> Dict[str, str]:
    """Write the report of the runs under ``paths`` into ``out``; returns {name: path} of what was written.

    Everything is made in a temporary folder inside ``out`` and then renamed into place, report.md last: a report
    stopped midway (a signal, a full disk) leaves the files of the previous report, or none, never a half-written
    one; the next report removes the leftovers of one that was killed (a test can hold it before the move:
    ``vit_gka.train.faults.pause_in_report``)."""
    paths = [os.path.abspath(p) for p in paths]
    rows = load_runs(find_runs(paths))
    out = os.path.abspath(out or (os.path.join(paths[0], 'report') if len(paths) == 1 else 'report'))
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX)
    try:
        made_files = _write_report(rows, paths, tmp, num_images)
        pause_in_report()
        files = {}
        for name in sorted(made_files, key=lambda n: n == 'report.md'):
            files[name] = os.path.join(out, name)
            os.replace(made_files[name], files[name])
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not os.listdir(out):
            os.rmdir(out)


def _write_report(rows: List[Dict], paths: List[str], out: str, num_images: int) -> Dict[str, str]:
    from vit_gka.analysis import plots
    t2 = table2(rows)
    measured, runtime_notes = runtime_rows(rows, paths)
    t4 = table4(rows, measured) if measured or not runtime_notes else []
    files = {'table2.csv': write_csv(t2, [('run', 'run'), ('data', 'data'), ('epochs', 'epochs'), ('kind', 'kind')] + TABLE2,
                                os.path.join(out, 'table2.csv')),
             'table4.csv': write_csv(t4, TABLE4, os.path.join(out, 'table4.csv'))}
    seed_rows = seed_table(rows)
    if seed_rows:
        files['table_seeds.csv'] = write_csv(seed_rows, SEED_COLUMNS, os.path.join(out, 'table_seeds.csv'))
    counted = [r for r in rows if r.get('gflops') is not None]
    if counted:
        files['top1_vs_gflops.png'] = plots.top1_vs_gflops(counted, os.path.join(out, 'top1_vs_gflops.png'),
                                                           seed_groups(counted))
    files['params_by_part.png'] = plots.params_by_part(rows, os.path.join(out, 'params_by_part.png'))
    curves = seeds.groups([r for r in rows if r['curve']], key=lambda r: (seeds.config_name(r), _pair_key(r)))
    if curves:
        files['learning_curves.png'] = plots.learning_curves(curves, os.path.join(out, 'learning_curves.png'))
    sparse = [r for r in rows if r['sparsity_layers']]
    if any(r['kind'] == 'compact' for r in sparse):
        files['sparsity.png'] = plots.sparsity(sparse, os.path.join(out, 'sparsity.png'))
    for path in attention_figures(rows, out, num_images):
        files[os.path.basename(path)] = path
    md = [f'# Report: {len(rows)} runs', '', 'Runs: ' + ', '.join(f"`{r['run']}`" for r in rows), '',
          '## Table 2: parameters, compute and accuracy',
          'GMACs = 1e9 multiply-accumulates per image (fvcore, attention included); GFLOPs = 2 x GMACs (the GKA '
          "paper's unit). top-1: the exported model/ weights (the better of raw and EMA). sparsity: mean over "
          'layers of the fraction of exact zeros in the attention weights (see below). Changes are against the '
          'baseline of the same shape, data and epochs.', '', markdown(t2, TABLE2), '',
          '## Table 4: runtime', 'From eval.py bench=true (bench.json) where present, else measured for this report '
          'when the jobs ran on this machine: each model and its same-shape baseline take turns in one process '
          '(interleaved rounds, medians; the source column names the device), never from runs that ran one after '
          'the other; a run without a baseline in the sweep shows its own training throughput.', '']
    md += runtime_notes + [''] if runtime_notes else []
    md += [markdown(t4, TABLE4), ''] if t4 else []
    failed = [r for r in collect(paths) if r['status'] == 'failed']
    if failed:
        md += ['## Failed jobs', 'Jobs of the sweep that ended without results (their logs have the details):', '']
        md += [f"- `{r['run']}` ({r.get('model_config')}, {' '.join(r.get('overrides') or [])}): {r['error']}"
               for r in failed] + ['']
    if seed_rows:
        md += ['## Seeds', 'Configurations with several seeds: top-1 mean +- standard deviation over n runs, and the '
               'change against the same-shape baseline as a mean difference with its 95% interval, paired by seed '
               'where both ran the same seeds (Student t on the per-seed differences), else Welch\'s.', '',
               markdown(seed_rows, SEED_COLUMNS), '']
    sigma_rows = [r for r in rows if r.get('sigma_table')]
    if sigma_rows:
        md += ['## Learned bandwidths', '']
        for r in sigma_rows:
            flat = [s for layer in r['sigma_table'] for s in layer]
            name = 'h' if r['kind'] == 'compact' else 'sigma'
            md.append(f"- {r['label']}: {name} from {min(flat):.3f} to {max(flat):.3f} (mean {sum(flat) / len(flat):.3f}, "
                      f"init {r.get('sigma_init') or 0:.3f}) over {len(r['sigma_table'])} layers x "
                      f"{len(r['sigma_table'][0])} heads")
        for r in [r for r in sigma_rows if r.get('token_sigma_spread')]:
            lo, hi = r['token_sigma_range']
            md.append(f"- {r['label']}: sigma per token from {lo:.3f} to {hi:.3f}; std of log sigma over tokens, "
                      f"per layer: " + ', '.join(f'{v:.3f}' for v in r['token_sigma_spread']))
        md.append('')
    if sparse:
        md += ['## Attention sparsity', 'Fraction of exact zeros of the attention weights, per layer, measured by '
               'training on the first test images with the final (model/) weights. Compact kernels are sparse by '
               'construction; GKA zeros are float32 underflow only. DeiT and VLT: not measured.', '']
        md += [f"- {r['label']} ({r['attention']}): mean {r['sparsity_mean']:.3f}; layers "
               + ', '.join(f'{v:.3f}' for v in r['sparsity_layers']) for r in sparse]
        md.append('')
    md += ['## Figures', ''] + [f'![{name}]({name})' for name in files if name.endswith('.png')] + ['']
    files['report.md'] = os.path.join(out, 'report.md')
    with open(files['report.md'], 'w') as f:
        f.write('\n'.join(md))
    return files


class ReportCallback(Callback):
    """Hydra callback: the report of a ``-m`` sweep in ``<sweep dir>/report`` when the sweep ends."""

    def __init__(self, num_images: int = 64) -> None:
        self.num_images = num_images

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get('RANK', '0') != '0':
            return
        sweep_dir = config.hydra.sweep.dir
        try:
            with stopping_on_signals():
                files = build_report([sweep_dir], num_images=self.num_images)
        except ReportError as e:
            log.warning('no report: %s', e)
            return
        except ReportStopped as e:  # the jobs are done; the report is made again from their folders at any time
            _stopped(e, sweep_dir, f'vit-gka-report {sweep_dir}')
        print(f"report: {files['report.md']} ({len(files) - 1} tables and figures)", flush=True)


class ReportStopped(BaseException):
    """A stop signal came while the report was made (a BaseException: no ``except Exception`` may swallow it)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def stopping_on_signals():
    """While active, a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: preemption.STOP_SIGNALS) raises
    ``ReportStopped`` at once, rather than waiting: a report can take minutes (models measured, test images run),
    longer than a cluster's grace period before SIGKILL, and it is made again from the run folders at any time.
    Further signals are ignored while the report cleans up; the previous handlers come back at the end."""
    from vit_gka.train.preemption import STOP_SIGNALS
    previous = {}

    def handle(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise ReportStopped(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread: signals stay as they are
            break
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(e: ReportStopped, where: str, again: str) -> None:
    """The one line of a report stopped by a signal, and the exit status of a stopped run."""
    from vit_gka.train.preemption import EXIT_STOPPED
    sys.stderr.write(f'stopped by {e.signal_name} while writing the report of {where}: report.md not written, no '
                     f'file left half-written; the runs are complete: to write the report, run {again}\n')
    sys.stderr.flush()
    raise SystemExit(EXIT_STOPPED)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'a positive integer is needed, got {text!r}')
    return int(text)


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description='Paper-style report (Markdown + CSV tables, PNG plots) of finished training runs: '
        'Table 2 (params, GMACs, top-1, each run against its same-shape DeiT baseline), Table 4 (runtime), the '
        'learned bandwidths, attention sparsity and mean attention distance.')
    p.add_argument('paths', nargs='+', metavar='FOLDER',
                   help='a multirun folder or run folders (searched recursively for results.json)')
    p.add_argument('--out', metavar='DIR', help='output folder (default: <FOLDER>/report for one folder, else ./report)')
    p.add_argument('--images', type=_positive_int, default=64, metavar='N',
                   help='test images for the mean attention distance (default: 64)')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """The command line; returns the exit status: 0, or 2 for a usage error (argparse's message) or a path
    without runs (one line ``error: ...``)."""
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
    try:
        args = parser(prog).parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), printed by argparse
        return int(e.code or 0)
    try:
        with stopping_on_signals():
            files = build_report(args.paths, args.out, args.images)
    except ReportError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except ReportStopped as e:
        _stopped(e, ' '.join(args.paths), 'the same command again')
    with open(files['report.md']) as f:
        print(f.read())
    print('wrote: ' + ', '.join(sorted(files.values())))
    return 0


def cli() -> None:
    """``vit-gka-report``: the console script."""
    sys.exit(main(prog='vit-gka-report'))


if __name__ == '__main__':
    sys.exit(main())
