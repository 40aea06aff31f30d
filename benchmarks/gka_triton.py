"""The Triton GKA operator (``impl='triton'``) on the GPU: is GKA faster than DeiT, as its FLOPs say?

    bash benchmarks/gpu.sh OUT kernel                  # this script with the GPU defaults, then pytest -m gpu
    python -m benchmarks.gka_triton --out kernel.json  # the same, by hand

* core: GKA on heads of the tokens (B, N, H, d), forward and forward + backward, through the Triton operator and
  through ``sdpa_pad``, next to SDPA on separate q, k, v at d = 64 with no bias (the ceiling: GKA reads one tensor
  where that reads three), at N = 197, 577, 4097, 16385 with batch x heads filling the GPU; peak memory per call;
  a 2-D window of radius 7 at the long lengths (the Triton kernels skip the key blocks out of reach);
* models: GKA-Ti/S/B (``impl='triton'``, and ``auto``) against DeiT-Ti/S/B, bf16 autocast as training runs:
  inference images/s at the best of ``--infer-batches``, training steps at batch 128 with peak memory, eager, and
  ``torch.compile``'d for ``--compiled-sizes`` (``eval.py bench=true``'s harness, the models interleaved round by
  round).

Every contender is checked against the float64 materialised GKA on random tokens before it is timed (never zeros);
timings are interleaved medians (``vit_gka.measure.benchmark``). Ratios are what to read. With ``--device cpu``
and ``TRITON_INTERPRET=1`` the script runs the interpreter on tiny shapes: a check that it works, not a measurement.
"""
import argparse
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vit_gka.measure.benchmark import (add_device_options, benchmark_models, device_and_dtype, interleaved_medians,
                                        peak_memory_mb, print_rows, ratio, write_json)
from vit_gka.errors import UserError, fail
from vit_gka.layers.gka import gka_reference
from vit_gka.layers.gka_backends import gka_sdpa_pad
from vit_gka.layers.gka_triton import gka_triton, triton_runs
from vit_gka.layers.masks import build_mask, resolve_grid

CEILING = 'sdpa q,k,v (no bias)'


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m benchmarks.gka_triton', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p, reps=20, warmup=5)
    p.set_defaults(dtype='bfloat16', train=True)
    p.add_argument('--seqs', type=int, nargs='+', default=[197, 577, 4097, 16385], metavar='N',
                   help='sequence lengths of the core rows (default: %(default)s)')
    p.add_argument('--heads', type=int, default=6, help='heads of the core rows (default: %(default)s)')
    p.add_argument('--head-dim', type=int, default=64, help='head width of the core rows (default: %(default)s)')
    p.add_argument('--batch-tokens', type=int, default=65536, metavar='TOKENS',
                   help='core batch = max(1, TOKENS // N), with --heads heads (default: %(default)s)')
    p.add_argument('--windows', type=int, nargs='*', default=[7], metavar='R',
                   help='2-D window radii timed at N >= --window-min-seq (default: %(default)s)')
    p.add_argument('--window-min-seq', type=int, default=4097, metavar='N', help='(default: %(default)s)')
    p.add_argument('--sizes', nargs='*', default=['tiny', 'small', 'base'], choices=['tiny', 'small', 'base'],
                   help='model rows: GKA-<size> vs DeiT-<size>; none for no model rows (default: %(default)s)')
    p.add_argument('--infer-batches', type=int, nargs='+', default=[256, 512], metavar='B',
                   help='inference batches; each model is reported at its best (default: %(default)s)')
    p.add_argument('--train-batch', type=int, default=128, help='(default: %(default)s)')
    p.add_argument('--compiled-sizes', nargs='*', default=['small'], choices=['tiny', 'small', 'base'],
                   help='sizes also timed torch.compile\'d (each compile of 3 models takes minutes; default: '
                        '%(default)s)')
    return p


def check_against_reference(out: torch.Tensor, x: torch.Tensor, log_sigma: torch.Tensor, mask, name: str) -> None:
    """The first sequence's first head of ``out`` (B, N, H, d) against float64 GKA (its N x N float64 weights are
    2 GB at N = 16385); a wrong contender is never timed."""
    x0 = x[:1, :, :1].double()
    expect = gka_reference(x0.transpose(1, 2), log_sigma[:1].double(), mask, eps=0.0).transpose(1, 2)
    err = ((out[:1, :, :1].double() - expect).abs().max() / expect.abs().max()).item()
    tol = 1e-4 if out.dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise SystemExit(f'error: {name} differs from float64 GKA by {err:.2e} (relative), more than {tol}')


def core_contenders(x, log_sigma, radius, train):
    """name -> call, on tokens x (B, N, H, d): the Triton operator, sdpa_pad on the heads view (as the layer calls
    it), and the no-bias SDPA ceiling on contiguous q, k, v (B, H, N, d)."""
    B, N, H, d = x.shape
    prefix, _, grid_w = resolve_grid(N) if radius is not None else (0, 1, 1)
    mask = None if radius is None else build_mask(N, x.device, window_2d=radius)
    xg = x.detach().requires_grad_(train)
    qkv = [torch.randn(B, H, N, d, device=x.device, dtype=x.dtype).requires_grad_(train) for _ in range(3)]
    impls = {
        'triton': lambda: gka_triton(xg, log_sigma, window_2d=radius, num_prefix_tokens=prefix, grid_w=grid_w),
        'sdpa_pad': lambda: gka_sdpa_pad(xg.transpose(1, 2), log_sigma, mask).transpose(1, 2),
    }
    if radius is None:
        impls[CEILING] = lambda: F.scaled_dot_product_attention(*qkv)
    for name, fn in impls.items():
        if name != CEILING:
            with torch.no_grad():
                check_against_reference(fn(), x, log_sigma, mask, name)

    def run(fn):
        def call():
            if train:
                fn().float().sum().backward()
            else:
                with torch.no_grad():
                    fn()
        return call
    return {name: run(fn) for name, fn in impls.items()}


def bench_core(cfg, device, dtype):
    rows = []
    for n in cfg.seqs:
        batch = max(1, cfg.batch_tokens // n)
        x = torch.randn(batch, n, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
        log_sigma = torch.full((cfg.heads,), cfg.head_dim ** 0.25, device=device).log()
        full_ms = {}
        for radius in [None, *[r for r in cfg.windows if n >= cfg.window_min_seq]]:
            for train in ([False, True] if cfg.train else [False]):
                fns = core_contenders(x, log_sigma, radius, train)
                medians = interleaved_medians(fns, device, cfg.reps, cfg.warmup)
                peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
                base = CEILING if CEILING in fns else None
                for name in fns:
                    ms = medians[name] * 1e3
                    if radius is None:
                        full_ms[(name, train)] = ms
                    rows.append(dict(
                        seq=n, batch=batch, heads=cfg.heads, window_2d=radius, direction='fwd+bwd' if train else 'fwd',
                        impl=name, ms=ms, vs_ceiling=None if base is None else medians[name] / medians[base],
                        vs_full=None if radius is None else full_ms[(name, train)] / ms, peak_mb=peaks[name],
                        memory_vs_ceiling=None if base is None else ratio(peaks[name], peaks[base])))
                print_rows(rows[-len(fns):], f'GKA core, N={n} B={batch} H={cfg.heads} d={cfg.head_dim} '
                                             f"window_2d={radius} {'forward + backward' if train else 'forward'}")
    return rows


def bench_models(cfg, device):
    rows = []
    for size in cfg.sizes:
        models = [dict(label=f'GKA-{size} triton', name=f'gka_deit_{size}_patch16_224', args=dict(impl='triton')),
                  dict(label=f'DeiT-{size}', name=f'deit_{size}_patch16_224', args={}),
                  dict(label=f'GKA-{size} auto', name=f'gka_deit_{size}_patch16_224', args={})]
        for compiled in ([False, True] if size in cfg.compiled_sizes else [False]):
            best = {}
            for batch in cfg.infer_batches:
                for r in benchmark_models(models, device, batch_size=batch, amp=True, train=False, compile=compiled):
                    if r['infer_images_per_s'] > best.get(r['label'], {}).get('infer_images_per_s', 0):
                        best[r['label']] = r
            trained = {r['label']: r for r in benchmark_models(models, device, batch_size=cfg.train_batch, amp=True,
                                                               train=True, compile=compiled)}
            deit = f'DeiT-{size}'
            for m in models:
                inf, tr = best[m['label']], trained[m['label']]
                rows.append(dict(
                    model=m['label'], compiled=compiled, infer_batch=inf['batch_size'],
                    infer_images_per_s=inf['infer_images_per_s'],
                    infer_vs_deit=inf['infer_images_per_s'] / best[deit]['infer_images_per_s'],
                    train_images_per_s=tr['train_images_per_s'],
                    train_vs_deit=tr['train_images_per_s'] / trained[deit]['train_images_per_s'],
                    train_peak_mb=tr['train_peak_mem_mb'],
                    train_memory_vs_deit=ratio(tr['train_peak_mem_mb'], trained[deit]['train_peak_mem_mb'])))
            print_rows(rows[-len(models):], f"models, bf16, {'compiled' if compiled else 'eager'}, training batch "
                                            f'{cfg.train_batch}')
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    try:
        device, dtype = device_and_dtype(args)
        if not triton_runs(torch.empty(0, device=device)):
            raise UserError(f'the Triton kernels do not run on {device}: use a CUDA device, or TRITON_INTERPRET=1 '
                            f'for a check on the CPU')
        torch.manual_seed(0)
        results = dict(core=bench_core(args, device, dtype), models=bench_models(args, device))
    except UserError as e:
        fail(str(e))
    write_json(args.out, vars(args), **results)


if __name__ == '__main__':
    main()
