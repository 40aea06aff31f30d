"""Compact-kernel attention (Epanechnikov / biweight / triweight, fixed / adaptive) against fused GKA.

    python -m benchmarks.kernels                                   # CPU, N = 197, 577, 1025
    python -m benchmarks.kernels device=cuda dtype=bfloat16 seqs=[197,577,1025,4097] train=true

One attention layer of the Small shape (D = 384, 6 heads of 64) per contender: fused GKA
(``GaussianKernelAttention(impl='auto')``) and ``KernelAttention`` for every kernel x normalisation
(dense: the N x N weights are materialised; entmax has no fused kernel). Every measurement interleaves
the contenders after a warm-up and reports medians (``benchmarks.common.interleaved_medians``);
peak memory is the process's peak-RSS growth on the CPU, ``max_memory_allocated`` on CUDA
(``benchmarks.common.peak_memory_mb``). ``zeros`` is the fraction of exact zeros of the weights at
the default initial bandwidth on Gaussian inputs (GKA has none), for scale, not a trained model's.
Options (OmegaConf ``key=value``): device, dtype, seqs, dim, heads, batch_tokens, reps, warmup, train
(also time forward + backward), out (a JSON file).
"""
import sys

import torch

from benchmarks.common import interleaved_medians, options, peak_memory_mb, print_rows, reexec_for_rss, write_json
from vit_gka import GaussianKernelAttention, KernelAttention
from vit_gka.layers.compact import KERNEL_DEGREE, attention_sparsity, attention_weights

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
    cfg, device, dtype = options(DEFAULTS, argv)
    write_json(cfg, rows=bench(cfg, device, dtype))


if __name__ == '__main__':
    reexec_for_rss('benchmarks.kernels')
    main(sys.argv[1:])
