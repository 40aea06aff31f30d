"""Compact-kernel attention (Epanechnikov / biweight / triweight, fixed / adaptive) against fused GKA.

    python -m benchmarks.kernels                                   # CPU, N = 197, 577, 1025
    python -m benchmarks.kernels device=cuda dtype=bfloat16 seqs=[197,577,1025,4097] train=true

One attention layer of the Small shape (D = 384, 6 heads of 64) per contender: fused GKA
(``GaussianKernelAttention(impl='auto')``) and ``KernelAttention`` for every kernel x normalisation
(dense: the N x N weights are materialised; entmax has no fused kernel). Every measurement interleaves
the contenders after a warm-up and reports medians (``benchmarks.attention.interleaved_medians``);
peak memory is the process's peak-RSS growth on the CPU, ``max_memory_allocated`` on CUDA
(``benchmarks.attention.peak_memory_mb``). ``zeros`` is the fraction of exact zeros of the weights at
the default initial bandwidth on Gaussian inputs (GKA has none), for scale, not a trained model's.
Options (OmegaConf ``key=value``): device, dtype, seqs, dim, heads, batch_tokens, reps, warmup, train
(also time forward + backward), out (a JSON file).
"""
import json
import os
import sys

if os.environ.get('MALLOC_MMAP_THRESHOLD_') is None and __name__ == '__main__':
    # Large blocks as their own mappings, so freed memory leaves the RSS and peak-RSS deltas are honest.
    os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'
    os.execv(sys.executable, [sys.executable, '-m', 'benchmarks.kernels', *sys.argv[1:]])

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.attention import interleaved_medians, peak_memory_mb, print_rows  # noqa: E402
from vit_gka import GaussianKernelAttention, KernelAttention  # noqa: E402
from vit_gka.kernels import KERNEL_DEGREE, attention_sparsity, attention_weights  # noqa: E402

DEFAULTS = dict(
    device='cuda' if torch.cuda.is_available() else 'cpu', dtype='float32', seqs=[197, 577, 1025],
    dim=384, heads=6, batch_tokens=4096, reps=5, warmup=1, train=False, out=None,
)
ALIASES = {('epanechnikov', 'fixed'): 'normalised ReLU', ('epanechnikov', 'adaptive'): 'sparsemax',
           ('biweight', 'adaptive'): 'entmax 1.5', ('triweight', 'adaptive'): 'entmax 4/3 (bisection)'}


def contenders(dim: int, heads: int, device, dtype) -> dict:
    """Name -> attention layer: fused GKA first, then every compact kernel x normalisation."""
    torch.manual_seed(0)
    layers = {'gka fused (auto)': GaussianKernelAttention(dim, heads, impl='auto')}
    for kernel in KERNEL_DEGREE:
        for normalization in ('fixed', 'adaptive'):
            alias = ALIASES.get((kernel, normalization))
            name = f'{kernel} {normalization}' + (f' ({alias})' if alias else '')
            layers[name] = KernelAttention(dim, heads, kernel=kernel, normalization=normalization)
    return {name: layer.to(device, dtype) for name, layer in layers.items()}


def call(layer, x, train: bool):
    def run():
        if train:
            layer(x).float().sum().backward()
        else:
            with torch.no_grad():
                layer(x)
    return run


def bench(cfg, device, dtype) -> list:
    rows = []
    layers = contenders(cfg.dim, cfg.heads, device, dtype)
    modes = ['inference', 'train'] if cfg.train else ['inference']
    for n in cfg.seqs:
        batch = max(1, cfg.batch_tokens // n)
        x = torch.randn(batch, n, cfg.dim, device=device, dtype=dtype)
        zeros = {name: float(attention_sparsity(*attention_weights(layer, x[:1]))) for name, layer in layers.items()}
        for mode in modes:
            xm = x.detach().requires_grad_(mode == 'train')
            fns = {name: call(layer, xm, mode == 'train') for name, layer in layers.items()}
            medians = interleaved_medians(fns, device, cfg.reps, cfg.warmup)
            base = medians['gka fused (auto)']
            block = [dict(N=n, batch=batch, mode=mode, attention=name, ms=medians[name] * 1e3,
                          time_vs_gka=medians[name] / base, peak_mb=peak_memory_mb(fn, device),
                          zeros=zeros[name])
                     for name, fn in fns.items()]
            rows += block
            print_rows(block, f'N={n}, batch {batch}, {mode}, {cfg.dtype}, dim {cfg.dim}, {cfg.heads} heads')
    return rows


def main(argv):
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli(argv))
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        sys.exit(f'error: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'
    print(f'device={device} ({where}), dtype={cfg.dtype}, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}')
    rows = bench(cfg, device, dtype)
    if cfg.out:
        with open(cfg.out, 'w') as f:
            json.dump(dict(config=OmegaConf.to_container(cfg), rows=rows), f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
