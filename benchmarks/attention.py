"""GKA vs standard attention, side by side in one process: the attention core and whole models.

    python -m benchmarks.attention                      # CPU defaults
    python -m benchmarks.attention device=cuda dtype=bfloat16 model_batch=256 seqs=[197,577,4097,16385]

Every measurement interleaves the contenders (A B C A B C ...) after a warm-up and reports medians,
so machine noise hits all of them alike; compare the ratios, not the absolute times. Peak memory (extra over
the inputs) is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak-RSS growth (VmHWM, reset through
/proc/self/clear_refs, with glibc returning large blocks to the OS) on the CPU.
Options (OmegaConf ``key=value``): device, dtype, seqs, heads, head_dim, core_batch_tokens, reps,
warmup, model_batch, models (pairs GKA,DeiT), img_size, train (also time forward+backward), windows
(2-D radii to time as well), out (a JSON file).
"""
import json
import os
import statistics
import sys
import time

if os.environ.get('MALLOC_MMAP_THRESHOLD_') is None and __name__ == '__main__':
    # Large blocks as their own mappings, so freed memory leaves the RSS and peak-RSS deltas are honest.
    os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'
    os.execv(sys.executable, [sys.executable, '-m', 'benchmarks.attention', *sys.argv[1:]])

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import vit_gka  # noqa: E402,F401
from timm.layers import Attention  # noqa: E402
from vit_gka import GaussianKernelAttention  # noqa: E402
from vit_gka.attention import gka_flex, gka_reference, gka_sdpa_bias, gka_sdpa_pad  # noqa: E402
from vit_gka.masks import build_mask, structural_mask_mod  # noqa: E402

DEFAULTS = dict(
    device='cuda' if torch.cuda.is_available() else 'cpu', dtype='float32', seqs=[197, 577, 1025, 4097],
    heads=6, head_dim=64, core_batch_tokens=8192, reps=7, warmup=2, model_batch=64, img_size=224,
    models=[['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224'],
            ['gka_deit_small_patch16_224', 'deit_small_patch16_224']],
    train=False, windows=[], reference_max_seq=4097, out=None,
)


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


def core_contenders(x, log_sigma, mask, train, max_ref_seq, radius=None):
    """Attention cores on heads x (B, H, N, d): timm's standard core (SDPA on q, k, v) and GKA's."""
    def run(f):
        def call():
            if train:
                out = f()
                out.float().sum().backward()
            else:
                with torch.no_grad():
                    f()
        return call

    qkv = [torch.randn_like(x).requires_grad_(train) for _ in range(3)]
    xg = x.detach().requires_grad_(train)
    fns = {
        'standard (SDPA q,k,v)': run(lambda: F.scaled_dot_product_attention(*qkv, attn_mask=mask)),
        'gka sdpa_bias': run(lambda: gka_sdpa_bias(xg, log_sigma, mask)),
        'gka sdpa_pad': run(lambda: gka_sdpa_pad(xg, log_sigma, mask)),
    }
    if x.is_cuda:  # compiled FlexAttention; windows as a block-sparse BlockMask (CPU flex: no backward)
        from torch.nn.attention.flex_attention import create_block_mask
        n = x.shape[-2]
        mask_mod = structural_mask_mod(n, window_2d=radius)
        block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, n, n, device=x.device)
        fns['gka flex'] = run(lambda: gka_flex(xg, log_sigma, block_mask))
    if x.shape[-2] <= max_ref_seq:
        fns['gka reference'] = run(lambda: gka_reference(xg, log_sigma, mask))
    return fns


def bench_core(cfg, device, dtype):
    rows = []
    for n in cfg.seqs:
        for radius in [None, *cfg.windows]:
            batch = max(1, cfg.core_batch_tokens // n)
            x = torch.randn(batch, cfg.heads, n, cfg.head_dim, device=device, dtype=dtype)
            log_sigma = torch.zeros(cfg.heads, device=device)
            mask = None if radius is None else build_mask(n, device, window_2d=radius)
            fns = core_contenders(x, log_sigma, mask, cfg.train, cfg.reference_max_seq, radius)
            medians = interleaved_medians(fns, device, cfg.reps, cfg.warmup)
            peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
            base = 'standard (SDPA q,k,v)'
            for name in fns:
                rows.append(dict(seq=n, batch=batch, window_2d=radius, impl=name, ms=medians[name] * 1e3,
                                 time_vs_standard=medians[name] / medians[base], peak_mb=peaks[name],
                                 memory_vs_standard=peaks[name] / max(peaks[base], 1e-9)))
            print_rows(rows[-len(fns):], f'attention core N={n} B={batch} window_2d={radius}')
    return rows


def bench_layers(cfg, device, dtype):
    """Whole attention layers, x (B, N, D) -> (B, N, D): timm's ``Attention`` (qkv, SDPA, proj) vs GKA
    (prologue, SDPA, proj). This is what a block pays; the core rows above leave out the q, k, v that
    the standard core receives ready-made."""
    rows, dim = [], cfg.heads * cfg.head_dim
    layers = {'timm Attention': Attention(dim, cfg.heads, qkv_bias=True),
              'GaussianKernelAttention': GaussianKernelAttention(dim, cfg.heads)}
    layers = {name: layer.to(device, dtype).eval() for name, layer in layers.items()}
    for n in cfg.seqs:
        batch = max(1, cfg.core_batch_tokens // n)
        x = torch.randn(batch, n, dim, device=device, dtype=dtype)

        def infer(layer):
            def call():
                with torch.no_grad():
                    layer(x)
            return call
        fns = {name: infer(layer) for name, layer in layers.items()}
        medians = interleaved_medians(fns, device, cfg.reps, cfg.warmup)
        peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
        base = 'timm Attention'
        for name in fns:
            rows.append(dict(seq=n, batch=batch, layer=name, ms=medians[name] * 1e3,
                             time_vs_timm=medians[name] / medians[base], peak_mb=peaks[name],
                             memory_vs_timm=peaks[name] / max(peaks[base], 1e-9)))
        print_rows(rows[-len(fns):], f'attention layer (inference) N={n} B={batch} D={dim}')
    return rows


def bench_models(cfg, device, dtype):
    rows = []
    for gka_name, base_name in cfg.models:
        models = {name: timm.create_model(name, img_size=cfg.img_size).to(device, dtype).eval()
                  for name in (gka_name, base_name)}
        x = torch.randn(cfg.model_batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)

        def infer(m):
            def call():
                with torch.no_grad():
                    m(x)
            return call
        medians = interleaved_medians({n: infer(m) for n, m in models.items()}, device, cfg.reps, cfg.warmup)
        for name in models:
            rows.append(dict(model=name, batch=cfg.model_batch, images_per_s=cfg.model_batch / medians[name],
                             speedup_vs_baseline=medians[base_name] / medians[name]))
        print_rows(rows[-2:], f'inference, batch {cfg.model_batch}, {dtype}')
    return rows


def print_rows(rows, title):
    keys = list(rows[0])
    print(f'\n### {title}\n')
    print('| ' + ' | '.join(keys) + ' |')
    print('|' + '---|' * len(keys))
    for row in rows:
        print('| ' + ' | '.join(f'{v:.3g}' if isinstance(v, float) else str(v) for v in row.values()) + ' |')


def main(argv):
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli(argv))
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        sys.exit(f'error: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    print(f'device={device} ({torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"}),'
          f' dtype={cfg.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}')
    torch.manual_seed(0)
    result = dict(config=OmegaConf.to_container(cfg), core=bench_core(cfg, device, dtype),
                  layers=bench_layers(cfg, device, dtype),
                  models=bench_models(cfg, device, dtype))
    if cfg.out:
        with open(cfg.out, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
