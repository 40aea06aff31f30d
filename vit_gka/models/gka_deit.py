"""GKA DeiT: projection-free Vision Transformers in timm's model registry.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu, Ghosh, Ghosh, Honavar,
arXiv 2605.02144 (2026). DeiT shapes from "Training data-efficient image transformers & distillation
through attention", Touvron et al., ICML 2021 (https://arxiv.org/abs/2012.12877).

* ``gka_deit_*``: DeiT with every attention replaced by Gaussian Kernel Attention (no W_Q, W_K, W_V).
* ``vlt_deit_*``: the paper's ablation (Table 5), dot-product attention without W_V.

``import vit_gka`` registers them; then ``timm.create_model('gka_deit_small_patch16_224')``. Every
VisionTransformer keyword passes through, and so do the attention's own: ``impl``, ``window``,
``window_2d``, ``sigma_init`` (GKA). No ImageNet weights are published yet: load your own with
``pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N)``.
"""
from typing import Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from vit_gka.layers.gka import GaussianKernelAttention
from vit_gka.layers.vlt import ValueFreeAttention

__all__ = ['GKA_ATTN_ARGS', 'checkpoint_filter_fn']

# Keyword arguments of create_model that configure the attention layer rather than the ViT.
GKA_ATTN_ARGS = ('impl', 'window', 'window_2d', 'sigma_init')


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2605.02144',
        'paper_name': 'Projection-Free Transformers via Gaussian Kernel Attention',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'gka_deit_tiny_patch16_224': _cfg(),
    'gka_deit_small_patch16_224': _cfg(),
    'gka_deit_base_patch16_224': _cfg(),
    'gka_deit_base_patch16_384': _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    'vlt_deit_tiny_patch16_224': _cfg(),
    'vlt_deit_small_patch16_224': _cfg(),
    'vlt_deit_base_patch16_224': _cfg(),
})


def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer) -> dict:
    """Unwrap training checkpoints and resample position embeddings (timm's ViT filter) for another
    image size. GKA weights keep timm's ViT key names, plus ``blocks.i.attn.log_sigma``."""
    for key in ('model', 'state_dict'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return vit_checkpoint_filter_fn(state_dict, model)


def bind_attn_args(cls: Type[nn.Module], **defaults) -> Type[nn.Module]:
    """A subclass of ``cls`` whose constructor defaults to ``defaults``.

    timm's ``Block`` instantiates ``attn_layer`` with a fixed set of keywords and requires a class (a
    ``functools.partial`` fails its issubclass check), so the attention's own arguments are bound here.
    """
    if not defaults:
        return cls

    class Bound(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**defaults, **kwargs})

    Bound.__name__ = Bound.__qualname__ = cls.__name__
    return Bound


def _require_weights(variant: str, kwargs: dict) -> None:
    """timm silently falls back to random weights when a config has no source; refuse instead."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict):
        raise RuntimeError(
            f'{variant} has no published weights: pass pretrained_cfg_overlay=dict(file=<weights>, '
            f'num_classes=<N>) or load a trained folder with "local-dir:<path>"')


def _create(variant: str, attn_cls: Type[nn.Module], pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        _require_weights(variant, kwargs)
    attn_args = {k: kwargs.pop(k) for k in GKA_ATTN_ARGS if k in kwargs}
    if attn_args and attn_cls is not GaussianKernelAttention:
        raise TypeError(f'{variant} does not take {sorted(attn_args)} (Gaussian kernel attention only)')
    model = build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        attn_layer=bind_attn_args(attn_cls, **attn_args),
        **kwargs,
    )
    for module in model.modules():  # the patch grid, for 2-D windows
        if isinstance(module, GaussianKernelAttention):
            module.grid_size = tuple(model.patch_embed.grid_size)
            module.num_prefix_tokens = model.num_prefix_tokens
    return model


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def gka_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """GKA-Ti: DeiT-Ti with Gaussian kernel attention (4.38 M parameters)."""
    return _create('gka_deit_tiny_patch16_224', GaussianKernelAttention, pretrained, **{**_TINY, **kwargs})


@register_model
def gka_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """GKA-S: DeiT-S with Gaussian kernel attention (16.73 M parameters)."""
    return _create('gka_deit_small_patch16_224', GaussianKernelAttention, pretrained, **{**_SMALL, **kwargs})


@register_model
def gka_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """GKA-B: DeiT-B with Gaussian kernel attention (65.31 M parameters)."""
    return _create('gka_deit_base_patch16_224', GaussianKernelAttention, pretrained, **{**_BASE, **kwargs})


@register_model
def gka_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """GKA-B at 384 x 384 (577 tokens)."""
    return _create(
        'gka_deit_base_patch16_384', GaussianKernelAttention, pretrained, **{**_BASE, 'img_size': 384, **kwargs})


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
