"""What every model family here shares: the pretrained config, the one builder and the ViT that keeps its
kernel-attention layers on its patch grid (as timm's models/deit.py builds DeiT).

``create_model`` keywords: every VisionTransformer one, ``out_indices`` (for ``features_only``), the
attention's own ``impl``, ``window``, ``window_2d``, ``sigma_init`` (projection-free kernel attention only), and
``gka_blocks`` (a hybrid: the kernel attention in those blocks, timm's dot-product attention in the others).
"""
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, register_notrace_module
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from vit_gka.layers import ProjectionFreeAttention, ValueFreeAttention

__all__ = ['ATTN_ARGS', 'KernelVisionTransformer', 'bind_attn_args', 'checkpoint_filter_fn']

# Keyword arguments of create_model that configure the attention layer rather than the ViT.
ATTN_ARGS = ('impl', 'window', 'window_2d', 'sigma_init')

# torch.fx (timm's create_feature_extractor, detection frameworks) treats these as leaves: their masks and
# backend choice branch on shapes, devices and dtypes, which symbolic tracing cannot follow.
register_notrace_module(ProjectionFreeAttention)
register_notrace_module(ValueFreeAttention)

_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


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


class KernelVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose projection-free attention layers know its patch grid (for
    ``window_2d``), also after ``set_input_size`` and, with ``dynamic_img_size``, per input size."""

    def __init__(self, gka_blocks: Optional[Sequence[int]] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if gka_blocks is not None:
            self._hybrid(gka_blocks, kwargs)
        self.follow_grid(self.patch_embed.grid_size)

    def _hybrid(self, gka_blocks: Sequence[int], kwargs: dict) -> None:
        """Keep the kernel attention in blocks ``gka_blocks`` only (e.g. local early layers); the others get timm's
        dot-product ``Attention`` (q, k, v projections), initialised as timm initialises a ViT."""
        depth = len(self.blocks)
        keep = sorted({int(i) for i in gka_blocks})
        if any(not 0 <= i < depth for i in keep):
            raise ValueError(f'gka_blocks={list(gka_blocks)}: block indices must be in 0 .. {depth - 1}')
        for i, block in enumerate(self.blocks):
            if i not in keep:
                block.attn = Attention(self.embed_dim, num_heads=block.attn.num_heads,
                                       qkv_bias=kwargs.get('qkv_bias', True), qk_norm=kwargs.get('qk_norm', False),
                                       attn_drop=kwargs.get('attn_drop_rate', 0.0),
                                       proj_drop=kwargs.get('proj_drop_rate', 0.0))
                named_apply(init_weights_vit_timm, block.attn)
        self.gka_blocks = keep

    def follow_grid(self, grid_size: Tuple[int, int]) -> None:
        """Set ``grid_size`` and ``num_prefix_tokens`` on every projection-free attention layer."""
        if isinstance(grid_size[0], torch.fx.Proxy):  # symbolic tracing: the layers are leaves, keep theirs
            return
        grid = (grid_size[0], grid_size[1])
        for module in self.modules():
            if isinstance(module, ProjectionFreeAttention) and (
                    module.grid_size != grid or module.num_prefix_tokens != self.num_prefix_tokens):
                module.grid_size = grid
                module.num_prefix_tokens = self.num_prefix_tokens

    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.follow_grid(self.patch_embed.grid_size)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:  # x is (B, H, W, C) here: the grid of this input
            self.follow_grid((x.shape[1], x.shape[2]))
        return super()._pos_embed(x)


def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer) -> dict:
    """Unwrap training checkpoints and resample position embeddings (timm's ViT filter) for another
    image size. Weights keep timm's ViT key names, plus ``blocks.i.attn.log_sigma``."""
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


def _create(
        variant: str,
        attn_cls: Type[nn.Module],
        pretrained: bool = False,
        attn_defaults: Optional[dict] = None,
        **kwargs,
) -> VisionTransformer:
    """Build ``variant``: a ViT whose every attention is ``attn_cls`` with ``attn_defaults`` and the
    caller's attention keywords bound; ``features_only=True`` gives timm's ``FeatureGetterNet``."""
    if pretrained:
        _require_weights(variant, kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    attn_args = {k: kwargs.pop(k) for k in ATTN_ARGS if k in kwargs}
    kernel_attention = issubclass(attn_cls, ProjectionFreeAttention)
    if attn_args and not kernel_attention:
        raise TypeError(f'{variant} does not take {sorted(attn_args)} (projection-free kernel attention only)')
    return build_model_with_cfg(
        KernelVisionTransformer if kernel_attention else VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        attn_layer=bind_attn_args(attn_cls, **{**(attn_defaults or {}), **attn_args}),
        **kwargs,
    )
