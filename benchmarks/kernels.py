"""Compact-kernel attention (Epanechnikov / biweight / triweight, fixed / adaptive) against fused GKA.

    python -m benchmarks.kernels                                   # CPU, N = 197, 577, 1025
    python -m benchmarks.kernels --device cuda --dtype bfloat16 --seqs 197 577 1025 4097 --train

One attention layer of the Small shape (D = 384, 6 heads of 64) per contender: fused GKA
(``GaussianKernelAttention(impl='auto')``) and ``KernelAttention`` for every kernel x normalisation
(dense: the N x N weights are materialised; entmax has no fused kernel). Every measurement interleaves
the contenders after a warm-up and reports medians; peak memory is the process's peak-RSS growth on the
CPU, ``max_memory_allocated`` on CUDA (the harness: vit_gka/measure/benchmark.py). ``zeros`` is the
fraction of exact zeros of the weights at the default initial bandwidth on Gaussian inputs (GKA has none),
for scale, not a trained model's.
"""
import argparse
from typing import Optional, Sequence

import torch

from vit_gka import GaussianKernelAttention, KernelAttention
from vit_gka.layers.compact import KERNEL_DEGREE
from vit_gka.measure.attention import attention_sparsity, attention_weights
from vit_gka.measure.benchmark import (add_device_options, device_and_dtype, interleaved_medians, peak_memory_mb,
                                        print_rows, reexec_for_rss, write_json)
from vit_gka.errors import UserError, fail

ALIASES = {('epanechnikov', 'fixed'): 'normalised ReLU', ('epanechnikov', 'adaptive'): 'sparsemax',
           ('biweight', 'adaptive'): 'entmax 1.5', ('triweight', 'adaptive'): 'entmax 4/3 (bisection)'}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m benchmarks.kernels', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p, reps=5, warmup=1)
    p.add_argument('--seqs', type=int, nargs='+', default=[197, 577, 1025], metavar='N',
                   help='sequence lengths (tokens) (default: %(default)s)')
    p.add_argument('--dim', type=int, default=384, help='model width D (default: %(default)s)')
    p.add_argument('--heads', type=int, default=6, help='attention heads (default: %(default)s)')
    p.add_argument('--batch-tokens', type=int, default=4096, metavar='TOKENS',
                   help='batch = max(1, TOKENS // N) (default: %(default)s)')
    return p


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The tables of the module docstring; mistakes end in one line ``error: ...``, exit status 2."""
    args = parser().parse_args(argv)
    try:
        device, dtype = device_and_dtype(args)
        rows = bench(args, device, dtype)
    except UserError as e:
        fail(str(e))
    write_json(args.out, vars(args), rows=rows)


if __name__ == '__main__':
    parser().parse_args()  # --help and mistakes answer before the re-exec
    reexec_for_rss('benchmarks.kernels')
    main()
