"""The one timing harness: synchronised timing, interleaved medians, peak memory, tables; and the model-vs-baseline
benchmark of ``eval.py bench=true``.

The harness (used by ``benchmark_models`` below and by ``benchmarks/attention.py``, ``benchmarks/kernels.py``):

* ``sync(device)``: wait for the device (CUDA) so that a clock reading covers the work;
* ``timed(fn, device, calls=1, warmup=0)``: seconds per call of ``fn`` over ``calls`` calls after ``warmup``
  untimed ones, synchronised before and after;
* ``interleaved_medians(fns, device, reps, warmup)``: the functions take turns (A B C A B C ...) after
  ``warmup`` untimed rounds, so clock and thermal drift hit all of them alike; median seconds per call;
* ``peak_memory_mb(fn, device)``: memory one call of ``fn`` holds at its peak beyond what was allocated
  before it: ``torch.cuda.max_memory_allocated`` on CUDA, the growth of the process's peak RSS on the CPU
  (VmHWM reset through /proc/self/clear_refs; Linux only, else ``None``). For honest CPU numbers run the
  process with ``MALLOC_MMAP_THRESHOLD_`` set (``reexec_for_rss``), so glibc returns large blocks to the OS;
* ``reset_peak(device)`` / ``allocated_peak_mb(device)``: the CUDA allocator's peak since the reset
  (``None`` on the CPU);
* ``add_device_options(parser, ...)`` / ``device_and_dtype(args)``: the ``--device --dtype --reps --warmup
  --train --out`` options the benchmark scripts share; ``ratio(a, b)``, ``print_rows(rows, title)`` (a Markdown
  table) and ``write_json(path, config, **results)``.

``benchmark_models`` (``eval.py bench=true``), in the manner of timm's benchmark.py: for each model inference
(no_grad forward) and training steps (forward, cross-entropy, backward, AdamW step) on random inputs of the
model's own size, ``warmup`` untimed then ``steps`` timed steps, bf16 autocast on CUDA, optionally through
``torch.compile`` (``compile=True``, as a training run on CUDA does; the first warm-up steps compile). The
models take turns round by round in one process and the median round is reported. Peak memory: ``torch.cuda.max_memory_allocated``
per phase (weights, optimizer state and inputs included; CUDA only, ``None`` on the CPU).
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

from vit_gka.errors import UserError

__all__ = ['sync', 'timed', 'interleaved_medians', 'peak_memory_mb', 'reset_peak', 'allocated_peak_mb',
           'reexec_for_rss', 'add_device_options', 'device_and_dtype', 'device_name', 'ratio', 'print_rows',
           'write_json',
           'baseline_name', 'with_baseline', 'benchmark_models']

# ---------------------------------------------------------------------------------------------- the harness


def sync(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work (CUDA; the CPU runs synchronously)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, calls: int = 1, warmup: int = 0) -> float:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``calls`` timed ones, synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def interleaved_medians(fns: Dict[Hashable, Callable[[], Any]], device: torch.device, reps: int,
                        warmup: int) -> Dict[Hashable, float]:
    """Median seconds per call of each function, timed one call at a time in ``reps`` interleaved rounds
    (A B C A B C ...) after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[Hashable, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def reset_peak(device: torch.device) -> None:
    """Start a new allocator peak (CUDA; nothing on the CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_peak_mb(device: torch.device) -> Optional[float]:
    """The CUDA allocator's peak since ``reset_peak``, in MiB (2**20 bytes); ``None`` on the CPU."""
    if torch.device(device).type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def _rss_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Memory one call of ``fn`` holds at its peak beyond what was allocated before it, in MiB (module docstring);
    ``None`` on a CPU without /proc (not Linux)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    if not os.path.exists('/proc/self/clear_refs'):
        return None
    before = _rss_kb('VmRSS:')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM (the peak RSS) to the current RSS
    fn()
    return (_rss_kb('VmHWM:') - before) / 1024


def reexec_for_rss(module: str) -> None:
    """Re-run this process once as ``python -m module`` with large allocations as their own mappings
    (``MALLOC_MMAP_THRESHOLD_``), so that freed blocks go back to the OS and peak-RSS growth measures what a
    call really holds. Call it first thing under ``if __name__ == '__main__'``."""
    if os.environ.get('MALLOC_MMAP_THRESHOLD_') is None:
        os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'
        os.execv(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]])


def add_device_options(parser: argparse.ArgumentParser, reps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --device --dtype --reps --warmup --train --out."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default: %(default)s)')
    parser.add_argument('--dtype', default='float32', help='torch dtype name, e.g. bfloat16 (default: %(default)s)')
    parser.add_argument('--reps', type=int, default=reps, help='timed interleaved rounds (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=warmup, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--train', action=argparse.BooleanOptionalAction, default=False,
                        help='also time forward + backward (default: inference only)')
    parser.add_argument('--out', default=None, metavar='FILE', help='write the options and results as JSON here')
    return parser


def device_name(device: torch.device) -> str:
    """The GPU's name, or the number of CPU cores."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'


def device_and_dtype(args: argparse.Namespace) -> Tuple[torch.device, torch.dtype]:
    """(device, dtype) of ``add_device_options``' arguments; prints the setting (device, dtype, versions)."""
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"--dtype {args.dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16)")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f'--device {args.device!r}: {e}') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device here')
    print(f'device={device} ({device_name(device)}), dtype={args.dtype}, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}', flush=True)
    return device, dtype


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b (b at least 1e-9), ``None`` when either is unknown (a peak memory off Linux)."""
    return None if a is None or b is None else a / max(b, 1e-9)


def print_rows(rows: List[Dict[str, Any]], title: str) -> None:
    """``rows`` (dicts with the same keys) as a Markdown table under ``### title``; floats to 3 digits."""
    keys = list(rows[0])
    print(f'\n### {title}\n')
    print('| ' + ' | '.join(keys) + ' |')
    print('|' + '---|' * len(keys))
    for row in rows:
        print('| ' + ' | '.join(f'{v:.3g}' if isinstance(v, float) else str(v) for v in row.values()) + ' |')
    sys.stdout.flush()


def write_json(path: Optional[str], config: Dict[str, Any], **results: Any) -> None:
    """``{"config": config, **results}`` as JSON in ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, 'w') as f:
            json.dump(dict(config=config, **results), f, indent=1)


# -------------------------------------------------------------------- the model benchmark (eval.py bench=true)

PREFIXES = ('gka_', 'gka_q_', 'gka_k_', 'vlt_', 'eka_fixed_', 'eka_adaptive_', 'bka_fixed_', 'bka_adaptive_',
            'tka_fixed_', 'tka_adaptive_')
ATTN_ONLY_ARGS = ('impl', 'window', 'window_2d', 'sigma_init')
PHASES = ('infer', 'train')


def baseline_name(name: str) -> Optional[str]:
    """deit_small_patch16_224 for gka_deit_small_patch16_224 (any registered projection-free prefix)."""
    for prefix in PREFIXES:
        if name.startswith(prefix) and timm.is_model(name[len(prefix):]):
            return name[len(prefix):]
    return None


def with_baseline(label: str, name: str, args: Dict[str, Any], baseline: Optional[str] = 'auto') -> List[Dict[str, Any]]:
    """[the model under test, its baseline] as ``{label, name, args}``: ``baseline='auto'`` is the same shape with
    timm's attention (``baseline_name``), a timm name that model with the same arguments but the attention's own
    (``impl``, ``window``, ...), ``None`` / ``''`` none."""
    models = [{'label': label, 'name': name, 'args': dict(args)}]
    base = baseline_name(name) if baseline == 'auto' else baseline
    if base:
        if not timm.is_model(base):
            raise UserError(f"unknown baseline model '{base}' (bench_cfg.baseline)")
        base_args = {k: v for k, v in args.items() if k not in ATTN_ONLY_ARGS}
        models.append({'label': f'{base} (same shape)' if base != name else f'{base} (baseline)',
                       'name': base, 'args': base_args})
    return models


class ModelUnderTest:
    """One model of ``benchmark_models``: its random inputs, optimizer, steps and per-round timings."""

    def __init__(self, label: str, name: str, args: Dict[str, Any], device: torch.device, batch_size: int,
                 amp: bool, compile: bool = False):
        self.label, self.name, self.device, self.batch_size = label, name, device, batch_size
        self.model = timm.create_model(name, **args).to(device)
        # torch.compile as a training run does it (compile=auto: on CUDA); the warm-up rounds absorb the compile
        self.forward = torch.compile(self.model) if compile else self.model
        self.input_size = tuple(self.model.pretrained_cfg['input_size'])
        embed = getattr(self.model, 'patch_embed', None)
        if embed is not None:
            self.input_size = (embed.proj.in_channels, *embed.img_size)
        self.x = torch.randn(batch_size, *self.input_size, device=device)
        self.y = torch.randint(0, self.model.num_classes, (batch_size,), device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        self.seconds: Dict[str, List[float]] = {phase: [] for phase in PHASES}  # per step, one entry per round
        self.peak: Dict[str, Optional[float]] = {phase: None for phase in PHASES}

    def infer_step(self) -> None:
        with torch.no_grad(), self.autocast:
            self.forward(self.x)

    def train_step(self) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.forward(self.x).float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run_round(self, phase: str, warmup: int, steps: int) -> None:
        """One turn: ``warmup`` untimed then ``steps`` timed steps of ``phase``; its time and allocator peak."""
        self.model.train(phase == 'train')
        reset_peak(self.device)
        self.seconds[phase].append(timed(getattr(self, f'{phase}_step'), self.device, calls=steps, warmup=warmup))
        peak = allocated_peak_mb(self.device)
        if peak is not None:
            self.peak[phase] = peak if self.peak[phase] is None else max(self.peak[phase], peak)

    def images_per_s(self, phase: str) -> Optional[float]:
        seconds = self.seconds[phase]
        return self.batch_size / statistics.median(seconds) if seconds else None

    def timm_columns(self) -> Dict[str, Any]:
        """The phases' numbers under timm benchmark.py's names (``infer_samples_per_sec``, ``infer_step_time`` in
        ms, ``infer_batch_size``, ``infer_img_size``; the same for ``train_``)."""
        out = {}
        for phase in PHASES:
            if self.seconds[phase]:
                out.update({f'{phase}_samples_per_sec': round(self.images_per_s(phase), 2),
                            f'{phase}_step_time': round(1e3 * statistics.median(self.seconds[phase]), 3),
                            f'{phase}_batch_size': self.batch_size, f'{phase}_img_size': self.input_size[-1]})
        return out


def benchmark_models(models: List[Dict[str, Any]], device: torch.device, batch_size: int = 64, warmup: int = 3,
                     steps: int = 10, rounds: int = 3, amp: bool = False, train: bool = True,
                     compile: bool = False) -> List[Dict[str, Any]]:
    """Inference (and training) images/s and peak memory of ``models`` (``with_baseline``'s list), interleaved
    round by round (module docstring); rows in that order, the first with ``ratio_*`` to the second. Prints
    the table and the ratios. Out of memory, the batch size backs off as timm's benchmark.py does
    (``decay_batch_step``: 64, 48, 32, 24, ...) and every model is measured again at the smaller batch."""
    from timm.utils import check_batch_size_retry, decay_batch_step
    if steps <= 0 or rounds <= 0 or warmup < 0 or batch_size <= 0:
        raise UserError('bench_cfg.steps, bench_cfg.rounds and bench_cfg.batch_size must be > 0, '
                        'bench_cfg.warmup >= 0')
    device = torch.device(device)
    while True:
        try:
            rows = _measure(models, device, batch_size, warmup, steps, rounds, amp, train, compile)
            break
        except torch.cuda.OutOfMemoryError as e:
            smaller = decay_batch_step(batch_size)
            if not smaller or not check_batch_size_retry(str(e)):
                raise UserError(f'out of memory at batch {batch_size} on {device_name(device)}; give '
                                f'bench_cfg.batch_size=<smaller>, or run on a device with more memory') from e
            print(f'out of memory at batch {batch_size}: measuring again at batch {smaller}', file=sys.stderr)
            batch_size = smaller
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    _print_benchmark(rows)
    return rows


def _measure(models: List[Dict[str, Any]], device: torch.device, batch_size: int, warmup: int, steps: int,
             rounds: int, amp: bool, train: bool, compile: bool) -> List[Dict[str, Any]]:
    """``benchmark_models``'s rows at one batch size, with timm benchmark.py's column names beside vit-gka's."""
    under_test = [ModelUnderTest(m['label'], m['name'], m['args'], device, batch_size, amp, compile)
                  for m in models]
    phases = PHASES if train else PHASES[:1]
    for _ in range(rounds):
        for phase in phases:
            for m in under_test:
                m.run_round(phase, warmup, steps)
    rows = [{
        'label': m.label, 'model': m.name, 'batch_size': m.batch_size, 'input_size': list(m.input_size),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'dtype': 'bf16' if amp else 'fp32', 'compiled': compile, 'steps': steps, 'rounds': rounds,
        'torch': torch.__version__, 'timm': timm.__version__,
        'infer_images_per_s': m.images_per_s('infer'), 'train_images_per_s': m.images_per_s('train'),
        'infer_peak_mem_mb': m.peak['infer'], 'train_peak_mem_mb': m.peak['train'],
        'baseline': under_test[1].label if len(under_test) > 1 and m is under_test[0] else None,
        'param_count': round(sum(p.numel() for p in m.model.parameters()) / 1e6, 2), **m.timm_columns(),
    } for m in under_test]
    if len(rows) > 1:
        for key in ('infer_images_per_s', 'train_images_per_s', 'infer_peak_mem_mb', 'train_peak_mem_mb'):
            a, base = rows[0][key], rows[1][key]
            rows[0][f'ratio_{key}'] = a / base if a is not None and base else None
    return rows


def _print_benchmark(rows: List[Dict[str, Any]]) -> None:
    from tabulate import tabulate
    cols = [('label', 'model'), ('dtype', 'dtype'), ('batch_size', 'batch'), ('infer_images_per_s', 'inference img/s'),
            ('train_images_per_s', 'training img/s'), ('infer_peak_mem_mb', 'inference peak MiB'),
            ('train_peak_mem_mb', 'training peak MiB')]
    fmt = (lambda v: '-' if v is None else f'{v:.0f}' if isinstance(v, float) else str(v))
    print(tabulate([[fmt(r[k]) for k, _ in cols] for r in rows], headers=[h for _, h in cols], tablefmt='github',
                   disable_numparse=True))
    if len(rows) > 1:
        r = rows[0]
        parts = [f"{what} x{r[f'ratio_{key}']:.2f}" for key, what in (
            ('infer_images_per_s', 'inference speed'), ('train_images_per_s', 'training speed'),
            ('train_peak_mem_mb', 'training memory')) if r.get(f'ratio_{key}') is not None]
        print(f"{rows[0]['label']} / {rows[1]['label']} ({rows[0]['device']}): " + ', '.join(parts), flush=True)
