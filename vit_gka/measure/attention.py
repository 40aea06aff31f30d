"""What a ViT's attention does: learned bandwidths, attention sparsity and mean attention distance per head.

Every number here comes from one materialisation of the attention weights, ``attention_weights``: a
projection-free layer's own ``weights()`` (GKA's Eq. 2-4, the compact kernels' exact sparse weights; masks
applied), softmax(q k^T / sqrt(d)) under the same masks for timm's ``Attention`` and ``ValueFreeAttention``.

* ``sigma_table(model)``: sigma = exp(log_sigma) per layer x head (for the compact kernels, the bandwidth h);
* ``attention_sparsity`` / ``AttentionSparsity`` / ``model_sparsity``: the fraction of exact zeros among
  the weights the masks allow, per layer (what training logs);
* ``token_bandwidths(model, images)``: sigma_i = exp(log_sigma_h + a_h . x_i) of every token, layer and head of
  the data-dependent-bandwidth layers (``gka_q`` / ``gka_k`` models), on ``images``;
* ``mean_attention_distance(model, images)``: per layer and head, the average over images and patch queries
  of sum_j w_ij ||p_i - p_j|| / sum_j w_ij over patch keys j, in patches (Euclidean, on the patch grid;
  prefix tokens such as the class token are left out as queries and as keys), as in the ViT paper's Fig. 7.
"""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from vit_gka.layers import ProjectionFreeAttention, ValueFreeAttention, VariableBandwidthAttention
from vit_gka.layers.bandwidths import log_bandwidths
from vit_gka.layers.masks import build_mask

__all__ = ['AttentionSparsity', 'attention_modules', 'attention_sparsity', 'attention_weights',
           'mean_attention_distance', 'model_sparsity', 'sigma_table', 'token_bandwidths']

SUPPORTED = (ProjectionFreeAttention, ValueFreeAttention, Attention)


def sigma_table(model: nn.Module) -> Optional[torch.Tensor]:
    """(layers, heads) learned bandwidths of the kernel-attention layers, or None for a model without any."""
    rows = [m.log_sigma.detach().float().exp().cpu() for m in model.modules()
            if isinstance(m, ProjectionFreeAttention)]
    return torch.stack(rows) if rows else None


def _softmax_weights(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of timm's ``Attention`` or ``ValueFreeAttention``, in float32, under ``mask``."""
    B, N, C = x.shape
    if isinstance(module, ValueFreeAttention):
        q, k = module.qk(x).view(B, N, 2, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, _ = module.qkv(x).view(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = module.q_norm(q).float(), module.k_norm(k).float()
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if mask is None:
        return scores.softmax(-1)
    scores = scores.masked_fill(~mask, float('-inf')) if mask.dtype == torch.bool else scores + mask.float()
    return torch.nan_to_num(scores.softmax(-1), nan=0.0)  # fully masked rows: zeros


@torch.no_grad()
def attention_weights(
        module: nn.Module,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights (B, H, N, N) that ``module`` applies to its input tokens x (B, N, D), with every mask
    (causal, windows, ``attn_mask``) applied, and that mask (None if unmasked). No attention dropout.

    For GKA the weights are GKA's Eq. 2-4 in float32: they equal the fused path's softmax, so exact zeros
    there are float32 underflow.
    """
    if isinstance(module, ProjectionFreeAttention):
        return module.weights(x, attn_mask, is_causal), module.mask(x.shape[1], x.device, attn_mask, is_causal)
    if isinstance(module, (ValueFreeAttention, Attention)):
        mask = build_mask(x.shape[1], x.device, attn_mask, is_causal)
        return _softmax_weights(module, x, mask), mask
    raise TypeError(f'no attention weights for {type(module).__name__}')


def attention_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SUPPORTED)]


def _call_masks(args: tuple, kwargs: dict) -> Tuple[Optional[torch.Tensor], bool]:
    """(attn_mask, is_causal) of a call ``attn(x, attn_mask=..., is_causal=...)``, as timm's Block makes it."""
    attn_mask = kwargs.get('attn_mask', args[1] if len(args) > 1 else None)
    is_causal = kwargs.get('is_causal', args[2] if len(args) > 2 else False)
    return attn_mask, is_causal


# ---------------------------------------------------------------------------------------------------
# Attention sparsity: the fraction of exact zeros in the attention weights, per layer.

def attention_sparsity(weights: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of exact zeros of ``weights`` (..., N, N), a 0-dim float tensor.

    With an SDPA-style ``mask`` (bool True = may attend, or additive with -inf) only the entries the
    mask allows are counted, so the number measures the kernel's sparsity, not the mask's.
    """
    zeros = weights == 0
    if mask is None:
        return zeros.float().mean()
    allowed = mask if mask.dtype == torch.bool else mask > float('-inf')
    allowed = allowed.expand_as(weights)
    return (zeros & allowed).sum().float() / allowed.sum().clamp_min(1).float()


class AttentionSparsity:
    """Forward hooks that record each kernel-attention layer's sparsity (fraction of exact zeros).

    Every ``ProjectionFreeAttention`` (GKA and all ``KernelAttention`` layers) in ``model`` gets a hook that
    recomputes the layer's weights from its input under ``no_grad`` (one extra dense attention per layer;
    enable it only on the steps you log) and stores the fraction of exact zeros among the entries its mask
    allows::

        with AttentionSparsity(model) as sparsity:
            model(images)
        for name, value in sparsity.values.items():   # {'blocks.0.attn': 0.93, ...}
            writer.add_scalar(f'sparsity/{name}', value, step)

    ``values`` keeps the last forward's numbers (python floats); ``mean()`` is their average. Use
    ``attach()`` / ``detach()`` instead of ``with`` to keep the hooks across several forwards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, ProjectionFreeAttention)}
        self.values: Dict[str, float] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            weights, mask = attention_weights(module, args[0], *_call_masks(args, kwargs))
            self.values[name] = float(attention_sparsity(weights, mask))
        return hook

    def attach(self) -> 'AttentionSparsity':
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                             for name, m in self.layers.items()]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def mean(self) -> float:
        return sum(self.values.values()) / len(self.values) if self.values else float('nan')

    def __enter__(self) -> 'AttentionSparsity':
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


@torch.no_grad()
def model_sparsity(model: nn.Module, images: torch.Tensor, autocast=None) -> Optional[Dict[str, object]]:
    """Per-layer attention sparsity of ``model`` on one batch: ``{'mean': float, 'layers': [float, ...]}``
    (layers in model order), or None for a model without kernel attention (DeiT, VLT).

    One forward in eval mode (no dropout or drop path) under ``autocast`` (a context-manager factory such
    as ``accelerator.autocast``; default none), with ``AttentionSparsity`` attached: about twice one eval
    batch's attention cost. A ``torch.compile``'d model is measured through its original module, whose
    forward hooks run eagerly. GKA layers are measured too: their exact zeros are float32 underflow of
    exp(-||x_i - x_j||^2 / 2 sigma^2), so essentially 0.
    """
    model = getattr(model, '_orig_mod', model)
    meter = AttentionSparsity(model)
    if not meter.layers:
        return None
    was_training = model.training
    model.eval()
    try:
        with meter, (autocast() if autocast is not None else contextlib.nullcontext()):
            model(images)
    finally:
        model.train(was_training)
    layers: List[float] = [meter.values[name] for name in meter.layers if name in meter.values]
    return {'mean': sum(layers) / len(layers) if layers else float('nan'), 'layers': layers}


# ---------------------------------------------------------------------------------------------------
# Mean attention distance.

def _patch_distances(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    embed = model.patch_embed
    gh, gw = (embed.dynamic_feat_size(tuple(images.shape[-2:])) if getattr(model, 'dynamic_img_size', False)
              else embed.grid_size)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float().to(images.device)
    return torch.cdist(coords, coords)  # (P, P) in patches


def _run_with_pre_hooks(model: nn.Module, images: torch.Tensor, modules: List[nn.Module], make_hook) -> None:
    """One eval-mode forward of ``model`` on ``images`` with ``make_hook(i)`` as a forward pre-hook (with kwargs) of
    ``modules[i]``; the hooks removed and the training mode restored afterwards."""
    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_attention_distance(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(layers, heads) mean attention distance in patches on ``images`` (see the module docstring)."""
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f'{type(model).__name__} has no attention layer this analysis can read')
    prefix = model.num_prefix_tokens
    dist = _patch_distances(model, images)
    result = [None] * len(modules)

    def hook(index):
        def fn(module, args, kwargs):
            weights, _ = attention_weights(module, args[0], *_call_masks(args, kwargs))
            w = weights[..., prefix:, prefix:]  # patch queries x patch keys
            d = (w * dist).sum(-1) / w.sum(-1).clamp_min(1e-12)
            result[index] = d.mean(dim=(0, 2)).cpu()  # mean over images and queries -> (H,)
        return fn

    _run_with_pre_hooks(model, images, modules, hook)
    return torch.stack(result)


@torch.no_grad()
def token_bandwidths(model: nn.Module, images: torch.Tensor) -> Optional[torch.Tensor]:
    """(layers, images, heads, tokens) bandwidths sigma_i = exp(log_sigma_h + a_h . x_i) of the data-dependent
    layers (``VariableBandwidthAttention``) on ``images``, from each layer's own input (the LayerNorm'd tokens,
    read by a forward pre-hook); None for a model without such layers."""
    modules = [m for m in model.modules() if isinstance(m, VariableBandwidthAttention)]
    if not modules:
        return None
    result = [None] * len(modules)

    def hook(index):
        def fn(module, args, kwargs):
            heads = module.split_heads(args[0])
            result[index] = log_bandwidths(heads, module.log_sigma, module.log_sigma_proj).exp().float().cpu()
        return fn

    _run_with_pre_hooks(model, images, modules, hook)
    return torch.stack(result)
