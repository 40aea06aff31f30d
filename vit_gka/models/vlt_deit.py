"""VLT DeiT: the GKA paper's ablation (Table 5), dot-product attention without W_V, in timm's registry.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu et al., arXiv 2605.02144 (2026);
DeiT shapes (Touvron et al., ICML 2021). It isolates what removing W_V alone costs, next to GKA. Every
VisionTransformer keyword passes through; the kernel-attention keywords (``impl``, ``window``, ...) are
refused with a TypeError. No weights are published.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from vit_gka.layers import ValueFreeAttention
from vit_gka.models._builder import _BASE, _SMALL, _TINY, _cfg, _create

__all__ = []

default_cfgs = generate_default_cfgs({
    'vlt_deit_tiny_patch16_224': _cfg(),
    'vlt_deit_small_patch16_224': _cfg(),
    'vlt_deit_base_patch16_224': _cfg(),
})


@register_model
def vlt_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """VLT-Ti (paper Table 5): DeiT-Ti attention without the value projection (5.28 M parameters)."""
    return _create('vlt_deit_tiny_patch16_224', ValueFreeAttention, pretrained, **{**_TINY, **kwargs})


@register_model
def vlt_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """VLT-S: DeiT-S attention without the value projection."""
    return _create('vlt_deit_small_patch16_224', ValueFreeAttention, pretrained, **{**_SMALL, **kwargs})


@register_model
def vlt_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """VLT-B: DeiT-B attention without the value projection."""
    return _create('vlt_deit_base_patch16_224', ValueFreeAttention, pretrained, **{**_BASE, **kwargs})
