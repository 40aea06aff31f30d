"""GKA DeiT: projection-free Vision Transformers in timm's model registry.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu, Ghosh, Ghosh, Honavar,
arXiv 2605.02144 (2026). DeiT shapes from "Training data-efficient image transformers & distillation
through attention", Touvron et al., ICML 2021 (https://arxiv.org/abs/2012.12877).

``gka_deit_*``: DeiT with every attention replaced by Gaussian Kernel Attention (no W_Q, W_K, W_V).
``gka_q_deit_*`` / ``gka_k_deit_*``: the same with a data-dependent bandwidth per query / per key token
(``vit_gka.layers.bandwidths``, the paper's future work): log sigma_i = log_sigma_h + a_h . x_i, a initialised to 0,
so a fresh model computes what GKA does; depth x D parameters more than GKA.
``import vit_gka`` registers them; then ``timm.create_model('gka_deit_small_patch16_224')``. Every
VisionTransformer keyword passes through, and so do the attention's own: ``impl``, ``window``,
``window_2d``, ``sigma_init``. No ImageNet weights are published yet: load your own with
``pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N)``.
"""
from timm.models import generate_default_cfgs, register_model

from vit_gka.layers import GaussianKernelAttention, VariableBandwidthAttention
from vit_gka.models._builder import _BASE, _SMALL, _TINY, KernelVisionTransformer, _cfg, _create

__all__ = []

default_cfgs = generate_default_cfgs({
    'gka_deit_tiny_patch16_224': _cfg(),
    'gka_deit_small_patch16_224': _cfg(),
    'gka_deit_base_patch16_224': _cfg(),
    'gka_deit_base_patch16_384': _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    **{f'gka_{b}_deit_{size}_patch16_224': _cfg() for b in 'qk' for size in ('tiny', 'small', 'base')},
    **{f'gka_{b}_deit_base_patch16_384': _cfg(input_size=(3, 384, 384), crop_pct=1.0) for b in 'qk'},
})


@register_model
def gka_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-Ti: DeiT-Ti with Gaussian kernel attention (4.38 M parameters)."""
    return _create('gka_deit_tiny_patch16_224', GaussianKernelAttention, pretrained, **{**_TINY, **kwargs})


@register_model
def gka_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-S: DeiT-S with Gaussian kernel attention (16.73 M parameters)."""
    return _create('gka_deit_small_patch16_224', GaussianKernelAttention, pretrained, **{**_SMALL, **kwargs})


@register_model
def gka_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B: DeiT-B with Gaussian kernel attention (65.31 M parameters)."""
    return _create('gka_deit_base_patch16_224', GaussianKernelAttention, pretrained, **{**_BASE, **kwargs})


@register_model
def gka_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B at 384 x 384 (577 tokens)."""
    return _create(
        'gka_deit_base_patch16_384', GaussianKernelAttention, pretrained, **{**_BASE, 'img_size': 384, **kwargs})


def _create_variable(
        variant: str, bandwidth: str, shape: dict, pretrained: bool, kwargs: dict) -> KernelVisionTransformer:
    return _create(variant, VariableBandwidthAttention, pretrained, attn_defaults=dict(bandwidth=bandwidth),
                   **{**shape, **kwargs})


@register_model
def gka_q_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-Ti with a bandwidth per query token (GKA-Ti + 12 x 192 parameters)."""
    return _create_variable('gka_q_deit_tiny_patch16_224', 'query', _TINY, pretrained, kwargs)


@register_model
def gka_q_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-S with a bandwidth per query token (GKA-S + 12 x 384 parameters)."""
    return _create_variable('gka_q_deit_small_patch16_224', 'query', _SMALL, pretrained, kwargs)


@register_model
def gka_q_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B with a bandwidth per query token (GKA-B + 12 x 768 parameters)."""
    return _create_variable('gka_q_deit_base_patch16_224', 'query', _BASE, pretrained, kwargs)


@register_model
def gka_q_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B at 384 x 384 with a bandwidth per query token."""
    return _create_variable('gka_q_deit_base_patch16_384', 'query', {**_BASE, 'img_size': 384}, pretrained, kwargs)


@register_model
def gka_k_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-Ti with a bandwidth per key token (GKA-Ti + 12 x 192 parameters)."""
    return _create_variable('gka_k_deit_tiny_patch16_224', 'key', _TINY, pretrained, kwargs)


@register_model
def gka_k_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-S with a bandwidth per key token (GKA-S + 12 x 384 parameters)."""
    return _create_variable('gka_k_deit_small_patch16_224', 'key', _SMALL, pretrained, kwargs)


@register_model
def gka_k_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B with a bandwidth per key token (GKA-B + 12 x 768 parameters)."""
    return _create_variable('gka_k_deit_base_patch16_224', 'key', _BASE, pretrained, kwargs)


@register_model
def gka_k_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA-B at 384 x 384 with a bandwidth per key token."""
    return _create_variable('gka_k_deit_base_patch16_384', 'key', {**_BASE, 'img_size': 384}, pretrained, kwargs)
