"""GKA vs standard attention, side by side in one process: the attention core, the attention layer and
whole models.

    python -m benchmarks.attention                      # CPU defaults
    bash benchmarks/gpu.sh                              # every GPU number (bf16, N up to 16385, windows)

* core: timm's standard core (SDPA on ready-made q, k, v) vs each GKA backend on heads x (B, H, N, d);
* layer: timm's ``Attention`` (qkv, SDPA, proj) vs ``GaussianKernelAttention`` on tokens (B, N, D);
* models: GKA vs DeiT inference images/s.

Every measurement interleaves the contenders (A B C A B C ...) after a warm-up and reports medians,
so machine noise hits all of them alike; compare the ratios, not the absolute times. ``peak_mb`` is the
memory a call allocates beyond its inputs (``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the
process's peak-RSS growth, VmHWM reset through /proc/self/clear_refs, with glibc returning large blocks
to the OS); ``with_inputs_mb`` adds the inputs each core needs (q, k, v for the standard one, x for GKA).
Options (OmegaConf ``key=value``): device, dtype, seqs, heads, head_dim, core_batch_tokens, reps,
warmup, model_batch, models (pairs GKA,DeiT), img_size, train (also time forward+backward), windows
(2-D radii to time as well), out (a JSON file).
"""
import sys

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention

from benchmarks.common import interleaved_medians, options, peak_memory_mb, print_rows, reexec_for_rss, write_json
from vit_gka import GaussianKernelAttention
from vit_gka.layers.gka import gka_flex, gka_reference, gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.masks import build_mask, structural_mask_mod

STANDARD = 'standard (SDPA q,k,v)'
DEFAULTS = dict(
    device='cuda' if torch.cuda.is_available() else 'cpu', dtype='float32', seqs=[197, 577, 1025, 4097],
    heads=6, head_dim=64, core_batch_tokens=8192, reps=7, warmup=2, model_batch=64, img_size=224,
    models=[['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224'],
            ['gka_deit_small_patch16_224', 'deit_small_patch16_224']],
    train=False, windows=[], reference_max_seq=4097, out=None,
)


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
        STANDARD: run(lambda: F.scaled_dot_product_attention(*qkv, attn_mask=mask)),
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
            # What each core also holds while it runs: its inputs, q, k, v for the standard one, x for GKA.
            x_mb = x.numel() * x.element_size() / 2 ** 20
            held = {name: peak + (3 if name == STANDARD else 1) * x_mb for name, peak in peaks.items()}
            for name in fns:
                rows.append(dict(seq=n, batch=batch, window_2d=radius, impl=name, ms=medians[name] * 1e3,
                                 time_vs_standard=medians[name] / medians[STANDARD], peak_mb=peaks[name],
                                 memory_vs_standard=peaks[name] / max(peaks[STANDARD], 1e-9),
                                 with_inputs_mb=held[name], with_inputs_vs_standard=held[name] / held[STANDARD]))
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


def main(argv):
    cfg, device, dtype = options(DEFAULTS, argv)
    torch.manual_seed(0)
    write_json(cfg, core=bench_core(cfg, device, dtype), layers=bench_layers(cfg, device, dtype),
               models=bench_models(cfg, device, dtype))


if __name__ == '__main__':
    reexec_for_rss('benchmarks.attention')
    main(sys.argv[1:])
