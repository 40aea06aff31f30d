"""GKA DeiT: projection-free Vision Transformers in timm's model registry.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu, Ghosh, Ghosh, Honavar,
arXiv 2605.02144 (2026). DeiT shapes from "Training data-efficient image transformers & distillation
through attention", Touvron et al., ICML 2021 (https://arxiv.org/abs/2012.12877).

``gka_deit_*``: DeiT with every attention replaced by Gaussian Kernel Attention (no W_Q, W_K, W_V).
``gka_q_deit_*`` / ``gka_k_deit_*``: the same with a data-dependent bandwidth per query / per key token
(``vit_gka.layers.bandwidths``, the paper's future work): log sigma_i = log_sigma_h + a_h . x_i, a initialised to 0,
so a fresh model computes what GKA does; depth x D parameters more than GKA.
``gka_deit_fmnist_patch7_28``: GKA at the Fashion-MNIST quickstart's shape, with weights this project trained and
ships (tag ``vitgka_fmnist``, the default): ``timm.create_model('gka_deit_fmnist_patch7_28', pretrained=True)``
loads them offline (README "A pretrained GKA").
``import vit_gka`` registers them; then ``timm.create_model('gka_deit_small_patch16_224')``. Every
VisionTransformer keyword passes through, and so do the attention's own: ``impl``, ``window``,
``window_2d``, ``sigma_init``. No ImageNet weights are published yet: the ``in1k`` tags are their slots (an
empty ``hf_hub_id``: fill it in once weights are on the Hugging Face Hub, e.g. with ``vit-gka-publish``); until
then load your own with ``pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N)`` or
``pretrained_cfg_overlay=dict(hf_hub_id='<user>/<repo>')``.
"""
import os

from timm.models import generate_default_cfgs, register_model

from vit_gka.layers import GaussianKernelAttention, VariableBandwidthAttention
from vit_gka.models._builder import _BASE, _SMALL, _TINY, KernelVisionTransformer, _cfg, _create

__all__ = ['FMNIST_WEIGHTS', 'FMNIST_TOP1']

# The shipped Fashion-MNIST weights (safetensors, in the package) and the test top-1 eval.py measures on them
# (tests/test_pretrained.py); the command that trained them is in the README.
FMNIST_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights',
                              'gka_deit_fmnist_patch7_28.vitgka_fmnist.safetensors')
FMNIST_TOP1 = 91.06
FMNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                 'Ankle boot')
_FMNIST = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)

default_cfgs = generate_default_cfgs({
    'gka_deit_tiny_patch16_224.in1k': _cfg(hf_hub_id=''),
    'gka_deit_small_patch16_224.in1k': _cfg(hf_hub_id=''),
    'gka_deit_base_patch16_224.in1k': _cfg(hf_hub_id=''),
    'gka_deit_base_patch16_384.in1k': _cfg(hf_hub_id='', input_size=(3, 384, 384), crop_pct=1.0),
    'gka_deit_fmnist_patch7_28.vitgka_fmnist': _cfg(
        file=FMNIST_WEIGHTS, num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0,
        interpolation='bilinear', label_names=FMNIST_LABELS, license='mit'),  # Fashion-MNIST's licence
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
def gka_deit_fmnist_patch7_28(pretrained: bool = False, **kwargs) -> KernelVisionTransformer:
    """GKA at the Fashion-MNIST quickstart shape (``shape=fmnist``): 28 x 28 x 1 input, patch 7 (16 tokens + the
    class token), width 128, 6 blocks of 4 heads, 10 classes (0.90 M parameters)."""
    return _create('gka_deit_fmnist_patch7_28', GaussianKernelAttention, pretrained, **{**_FMNIST, **kwargs})


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
