"""GKA vs standard attention, side by side in one process: the attention core, the attention layer and
whole models.

    python -m benchmarks.attention                      # CPU defaults
    python -m benchmarks.attention --seqs 197 577 --windows 7 --train --models   # no model rows
    bash benchmarks/gpu.sh                              # every GPU number (bf16, N up to 16385, windows)

* core: timm's standard core (SDPA on ready-made q, k, v) vs each GKA backend on heads x (B, H, N, d);
* layer: timm's ``Attention`` (qkv, SDPA, proj) vs ``GaussianKernelAttention`` on tokens (B, N, D);
* models: GKA vs DeiT inference images/s.

Every measurement interleaves the contenders (A B C A B C ...) after a warm-up and reports medians,
so machine noise hits all of them alike; compare the ratios, not the absolute times. ``peak_mb`` is the
memory a call allocates beyond its inputs (``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the
process's peak-RSS growth, VmHWM reset through /proc/self/clear_refs, with glibc returning large blocks
to the OS); ``with_inputs_mb`` adds the inputs each core needs (q, k, v for the standard one, x for GKA).
The timing harness is vit_gka/measure/benchmark.py.
"""
import argparse
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention

from vit_gka import GaussianKernelAttention
from vit_gka.layers.gka import gka_reference
from vit_gka.layers.gka_backends import gka_flex, gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.masks import build_mask, structural_mask_mod
from vit_gka.measure.benchmark import (add_device_options, device_and_dtype, interleaved_medians, peak_memory_mb,
                                        print_rows, ratio, reexec_for_rss, write_json)
from vit_gka.errors import UserError, fail

STANDARD = 'standard (SDPA q,k,v)'
MODELS = [('gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224'),
          ('gka_deit_small_patch16_224', 'deit_small_patch16_224')]


def _model_pair(text: str) -> tuple:
    names = tuple(text.split(','))
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f'expected GKA_MODEL,BASELINE_MODEL, got {text!r}')
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m benchmarks.attention', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p, reps=7, warmup=2)
    p.add_argument('--seqs', type=int, nargs='+', default=[197, 577, 1025, 4097], metavar='N',
                   help='sequence lengths (tokens) of the core and layer rows (default: %(default)s)')
    p.add_argument('--heads', type=int, default=6, help='attention heads (default: %(default)s)')
    p.add_argument('--head-dim', type=int, default=64, help='width of one head (default: %(default)s)')
    p.add_argument('--core-batch-tokens', type=int, default=8192, metavar='TOKENS',
                   help='batch = max(1, TOKENS // N) for the core and layer rows (default: %(default)s)')
    p.add_argument('--windows', type=int, nargs='*', default=[], metavar='R',
                   help='2-D window radii to time as well, core rows (default: none)')
    p.add_argument('--reference-max-seq', type=int, default=4097, metavar='N',
                   help='time the cores of quadratic memory (the materialised reference; sdpa_bias with a window) '
                        'up to this N (default: %(default)s)')
    p.add_argument('--models', type=_model_pair, nargs='*', default=MODELS, metavar='GKA,BASELINE',
                   help='model pairs for the inference rows; --models alone: none (default: %s)'
                        % ' '.join(','.join(pair) for pair in MODELS))
    p.add_argument('--model-batch', type=int, default=64, help='batch of the model rows (default: %(default)s)')
    p.add_argument('--img-size', type=int, default=224, help='image size of the model rows (default: %(default)s)')
    p.add_argument('--sdpa-kernels', action='store_true',
                   help='core rows also with SDPA pinned to each kernel that accepts the call (flash, efficient, '
                        'cudnn; CUDA), the standard core and each GKA SDPA backend alike')
    p.add_argument('--profile', action='store_true',
                   help='per core row, the device kernels one call runs and their share of its time (torch.profiler)')
    return p


SDPA_KERNELS = {'flash': 'FLASH_ATTENTION', 'efficient': 'EFFICIENT_ATTENTION', 'cudnn': 'CUDNN_ATTENTION'}


def pinned_sdpa(fns, device):
    """Each SDPA contender once more per SDPA kernel, pinned with ``torch.nn.attention.sdpa_kernel``: which
    kernel a backend reaches decides its speed (FlashAttention takes no additive bias, the padded head width
    of ``sdpa_pad`` is 72). A kernel that refuses the call (no kernel available) is left out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def under(fn, backend):
        def call():
            with sdpa_kernel(backend):
                fn()
        return call

    extra = {}
    for name, fn in fns.items():
        if name not in (STANDARD, 'gka sdpa_bias', 'gka sdpa_pad'):
            continue
        for short, backend in SDPA_KERNELS.items():
            call = under(fn, getattr(SDPBackend, backend))
            if runs(call):
                extra[f'{name} [{short}]'] = call
    return {**fns, **extra}


def kernel_shares(fn, device, top=4):
    """The device kernels (CPU: operators) one call of ``fn`` runs, the longest first, as 'name share%'."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if device.type == 'cuda' else [ProfilerActivity.CPU]
    fn()
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize(device) if device.type == 'cuda' else None
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0] if device.type == 'cuda' else \
        [e for e in prof.key_averages() if e.self_cpu_time_total > 0 and not e.key.startswith('ProfilerStep')]
    times = {e.key: e.self_device_time_total if device.type == 'cuda' else e.self_cpu_time_total for e in events}
    total = sum(times.values()) or 1
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return '; '.join(f'{name[:70]} {100 * t / total:.0f}%' for name, t in ranked)


def runs(fn) -> bool:
    """Whether ``fn`` runs: some kernels refuse some inputs ("No available kernel"); such rows are left out."""
    try:
        fn()
        return True
    except RuntimeError:
        return False


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
    fns = {STANDARD: run(lambda: F.scaled_dot_product_attention(*qkv, attn_mask=mask))}
    if mask is None or x.shape[-2] <= max_ref_seq:  # masked, the bias is a (B, H, N, N) tensor: quadratic
        fns['gka sdpa_bias'] = run(lambda: gka_sdpa_bias(xg, log_sigma, mask))
    fns['gka sdpa_pad'] = run(lambda: gka_sdpa_pad(xg, log_sigma, mask))
    if x.is_cuda:  # the padded form's options: v = x at the head's width (kernels that take it), width 128
        for name, kwargs in (('gka sdpa_pad v=x', dict(narrow_v=True)), ('gka sdpa_pad w=128', dict(width=128))):
            fn = run(lambda kwargs=kwargs: gka_sdpa_pad(xg, log_sigma, mask, **kwargs))
            if runs(fn):
                fns[name] = fn
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
            if cfg.sdpa_kernels and device.type == 'cuda':
                fns = pinned_sdpa(fns, device)
            medians = interleaved_medians(fns, device, cfg.reps, cfg.warmup)
            peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
            # What each core also holds while it runs: its inputs, q, k, v for the standard one, x for GKA.
            x_mb = x.numel() * x.element_size() / 2 ** 20
            held = {name: None if peak is None else peak + (3 if name == STANDARD else 1) * x_mb
                    for name, peak in peaks.items()}
            for name in fns:
                rows.append(dict(seq=n, batch=batch, window_2d=radius, impl=name, ms=medians[name] * 1e3,
                                 time_vs_standard=medians[name] / medians[STANDARD], peak_mb=peaks[name],
                                 memory_vs_standard=ratio(peaks[name], peaks[STANDARD]),
                                 with_inputs_mb=held[name], with_inputs_vs_standard=ratio(held[name], held[STANDARD])))
            print_rows(rows[-len(fns):], f'attention core N={n} B={batch} window_2d={radius}')
            if cfg.profile:
                for name, fn in fns.items():
                    rows[-len(fns) + list(fns).index(name)]['kernels'] = kernel_shares(fn, device)
                print_rows([{'impl': r['impl'], 'kernels': r['kernels']} for r in rows[-len(fns):]],
                           f'kernels of one call, N={n} window_2d={radius}')
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
                             memory_vs_timm=ratio(peaks[name], peaks[base])))
        print_rows(rows[-len(fns):], f'attention layer (inference) N={n} B={batch} D={dim}')
    return rows


def bench_models(cfg, device, dtype):
    rows = []
    for gka_name, base_name in cfg.models:
        for name in (gka_name, base_name):
            if not timm.is_model(name):
                raise UserError(f'--models: unknown model {name!r}')
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Every table of the module docstring; mistakes end in one line ``error: ...``, exit status 2."""
    args = parser().parse_args(argv)
    try:
        device, dtype = device_and_dtype(args)
        torch.manual_seed(0)
        results = dict(core=bench_core(args, device, dtype), layers=bench_layers(args, device, dtype),
                       models=bench_models(args, device, dtype))
    except UserError as e:
        fail(str(e))
    write_json(args.out, vars(args), **results)


if __name__ == '__main__':
    parser().parse_args()  # --help and mistakes answer before the re-exec
    reexec_for_rss('benchmarks.attention')
    main()
