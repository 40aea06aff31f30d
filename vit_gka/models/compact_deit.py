"""Compact-kernel DeiT: projection-free sparse kernel attention ViTs in timm's model registry.

Paper: "Sparse Attention as Compact Kernel Regression", Santos, Goncalves, McNamee, Treviso, Martins,
arXiv 2601.22766 (2026), on the projection-free layer of GKA ("Projection-Free Transformers via
Gaussian Kernel Attention", Kundu et al., arXiv 2605.02144) and DeiT's shapes (Touvron et al., ICML 2021,
https://arxiv.org/abs/2012.12877). Every attention is ``vit_gka.KernelAttention`` (no W_Q, W_K, W_V):

    <k>ka_<normalization>_deit_<size>_patch16_224
    k: e = Epanechnikov (1 - u^2)_+, b = biweight (1 - u^2)_+^2, t = triweight (1 - u^2)_+^3
    normalization: fixed (K / row sum; eka_fixed is normalised-ReLU attention) or
                   adaptive (alpha-entmax, alpha = 1 + 1/n: eka sparsemax, bka entmax-1.5, tka alpha 4/3)

so ``gka_deit_*`` (``gka_deit.py``) is the Gaussian member of the family and ``timm.list_models('?ka_*')`` lists
all of it. Parameter counts equal GKA's (4.38 M Tiny, 16.73 M Small: the kernel has no parameters
beyond the per-head bandwidth). Keywords as for GKA: every VisionTransformer one, plus ``impl``,
``window``, ``window_2d``, ``sigma_init`` (here the initial bandwidth h). No weights are published.
"""
from timm.models import generate_default_cfgs, register_model

from vit_gka.layers import KernelAttention
from vit_gka.models._builder import _SMALL, _TINY, KernelVisionTransformer, _cfg, _create

__all__ = ['COMPACT_MODELS']


def _compact_cfg(**kwargs) -> dict:
    return _cfg(paper_ids='arXiv:2601.22766', paper_name='Sparse Attention as Compact Kernel Regression', **kwargs)


# model name -> (kernel, normalization)
COMPACT_MODELS = {
    f'{abbr}_{norm}_deit_{size}_patch16_224': (kernel, norm)
    for abbr, kernel in (('eka', 'epanechnikov'), ('bka', 'biweight'), ('tka', 'triweight'))
    for norm in ('fixed', 'adaptive')
    for size in ('tiny', 'small')
}

default_cfgs = generate_default_cfgs({name: _compact_cfg() for name in COMPACT_MODELS})


def _create_compact(variant: str, shape: dict, pretrained: bool, kwargs: dict) -> KernelVisionTransformer:
    kernel, normalization = COMPACT_MODELS[variant]
    return _create(variant, KernelAttention, pretrained, attn_defaults=dict(kernel=kernel, normalization=normalization),
                   **{**shape, **kwargs})


@register_model
def eka_fixed_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, Epanechnikov kernel, fixed normalisation (normalised-ReLU attention)."""
    return _create_compact('eka_fixed_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def eka_fixed_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, Epanechnikov kernel, fixed normalisation (normalised-ReLU attention)."""
    return _create_compact('eka_fixed_deit_small_patch16_224', _SMALL, pretrained, kwargs)


@register_model
def eka_adaptive_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, Epanechnikov kernel, adaptive normalisation (sparsemax attention)."""
    return _create_compact('eka_adaptive_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def eka_adaptive_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, Epanechnikov kernel, adaptive normalisation (sparsemax attention)."""
    return _create_compact('eka_adaptive_deit_small_patch16_224', _SMALL, pretrained, kwargs)


@register_model
def bka_fixed_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, biweight kernel, fixed normalisation."""
    return _create_compact('bka_fixed_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def bka_fixed_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, biweight kernel, fixed normalisation."""
    return _create_compact('bka_fixed_deit_small_patch16_224', _SMALL, pretrained, kwargs)


@register_model
def bka_adaptive_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, biweight kernel, adaptive normalisation (entmax-1.5 attention)."""
    return _create_compact('bka_adaptive_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def bka_adaptive_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, biweight kernel, adaptive normalisation (entmax-1.5 attention)."""
    return _create_compact('bka_adaptive_deit_small_patch16_224', _SMALL, pretrained, kwargs)


@register_model
def tka_fixed_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, triweight kernel, fixed normalisation."""
    return _create_compact('tka_fixed_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def tka_fixed_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, triweight kernel, fixed normalisation."""
    return _create_compact('tka_fixed_deit_small_patch16_224', _SMALL, pretrained, kwargs)


@register_model
def tka_adaptive_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-Ti shape, triweight kernel, adaptive normalisation (alpha-entmax, alpha 4/3)."""
    return _create_compact('tka_adaptive_deit_tiny_patch16_224', _TINY, pretrained, kwargs)


@register_model
def tka_adaptive_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """DeiT-S shape, triweight kernel, adaptive normalisation (alpha-entmax, alpha 4/3)."""
    return _create_compact('tka_adaptive_deit_small_patch16_224', _SMALL, pretrained, kwargs)
