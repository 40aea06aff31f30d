"""What the benchmark scripts share: honest CPU peak memory, interleaved medians, options, tables.

Each script is a module (``python -m benchmarks.<name>``) that calls ``reexec_for_rss(__name__)`` first:
glibc then returns large blocks to the OS, so peak-RSS growth measures what a call really holds.
"""
import json
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf


def reexec_for_rss(module: str) -> None:
    """Re-run this process once with large allocations as their own mappings (MALLOC_MMAP_THRESHOLD_)."""
    if os.environ.get('MALLOC_MMAP_THRESHOLD_') is None:
        os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'
        os.execv(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]])


def options(defaults: dict, argv) -> tuple:
    """(cfg, device, dtype) from OmegaConf ``key=value`` arguments over ``defaults``; prints the setting."""
    cfg = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.from_cli(list(argv)))
    unknown = set(cfg) - set(defaults)
    if unknown:
        sys.exit(f'error: unknown option(s) {sorted(unknown)}; known: {sorted(defaults)}')
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'
    print(f'device={device} ({where}), dtype={cfg.dtype}, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}')
    return cfg, device, dtype


def write_json(cfg, **results) -> None:
    """The options and results as JSON in ``cfg.out`` (when set)."""
    if cfg.out:
        with open(cfg.out, 'w') as f:
            json.dump(dict(config=OmegaConf.to_container(cfg), **results), f, indent=1)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _rss_kb(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_memory_mb(fn, device):
    """Extra memory at the peak of one call of fn, in MB."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    before = _rss_kb('VmRSS:')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS
    fn()
    return (_rss_kb('VmHWM:') - before) / 1024


def interleaved_medians(fns: dict, device, reps: int, warmup: int) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds after a warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_rows(rows, title):
    keys = list(rows[0])
    print(f'\n### {title}\n')
    print('| ' + ' | '.join(keys) + ' |')
    print('|' + '---|' * len(keys))
    for row in rows:
        print('| ' + ' | '.join(f'{v:.3g}' if isinstance(v, float) else str(v) for v in row.values()) + ' |')
