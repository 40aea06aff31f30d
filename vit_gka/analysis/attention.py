"""What a trained ViT's attention does: learned GKA bandwidths and mean attention distance per head.

* ``sigma_table(model)``: sigma = exp(log_sigma) per layer x head of every GKA layer (for the compact-kernel
  ``KernelAttention`` layers, the same parameter is the bandwidth h).
* ``mean_attention_distance(model, images)``: per layer and head, the average over images and patch queries
  of sum_j w_ij ||p_i - p_j|| / sum_j w_ij over patch keys j, in patches (Euclidean, on the patch grid;
  prefix tokens such as the class token are left out as queries and as keys), as in the ViT paper's Fig. 7.
  The weights w are materialised from each attention layer's input, caught by a forward pre-hook: GKA with
  the paper's own formula (``vit_gka.attention.gka_reference``'s pieces), compact-kernel layers with
  ``vit_gka.kernels.compact_weights`` (their exact sparse weights), timm's ``Attention`` and
  ``ValueFreeAttention`` as softmax(q k^T / sqrt(d)).
"""
from typing import List, Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from vit_gka.layers.gka import GaussianKernelAttention, gaussian_kernel, pairwise_sq_dist, row_normalise
from vit_gka.layers.compact import compact_weights
from vit_gka.layers.vlt import ValueFreeAttention

SUPPORTED = (GaussianKernelAttention, ValueFreeAttention, Attention)


def sigma_table(model: nn.Module) -> Optional[torch.Tensor]:
    """(layers, heads) learned bandwidths sigma of the GKA layers, or None for a model without GKA."""
    rows = [m.log_sigma.detach().float().exp().cpu() for m in model.modules()
            if isinstance(m, GaussianKernelAttention)]
    return torch.stack(rows) if rows else None


def attention_weights(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) attention weights of ``module`` on its input tokens ``x`` (B, N, D), unmasked."""
    B, N, C = x.shape
    if getattr(module, 'degree', None) is not None:  # compact kernel (vit_gka.kernels.KernelAttention)
        heads = x.view(B, N, module.num_heads, module.head_dim).transpose(1, 2)
        return compact_weights(heads, module.log_sigma, module.degree, module.normalization)
    if isinstance(module, GaussianKernelAttention):
        heads = x.float().view(B, N, module.num_heads, module.head_dim).transpose(1, 2)
        return row_normalise(gaussian_kernel(pairwise_sq_dist(heads), module.log_sigma.float()), module.eps)
    if isinstance(module, ValueFreeAttention):
        q, k = module.qk(x).view(B, N, 2, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    elif isinstance(module, Attention):
        q, k, _ = module.qkv(x).view(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        raise TypeError(f'no attention weights for {type(module).__name__}')
    q, k = module.q_norm(q).float(), module.k_norm(k).float()
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


def attention_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SUPPORTED)]


def _patch_distances(model: nn.Module, device) -> torch.Tensor:
    gh, gw = model.patch_embed.grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float().to(device)
    return torch.cdist(coords, coords)  # (P, P) in patches


@torch.no_grad()
def mean_attention_distance(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(layers, heads) mean attention distance in patches on ``images`` (see the module docstring)."""
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f'{type(model).__name__} has no attention layer this analysis can read')
    prefix = model.num_prefix_tokens
    dist = _patch_distances(model, images.device)
    result = [None] * len(modules)

    def hook(index):
        def fn(module, args):
            w = attention_weights(module, args[0])[..., prefix:, prefix:]  # patch queries x patch keys
            d = (w * dist).sum(-1) / w.sum(-1).clamp_min(1e-12)
            result[index] = d.mean(dim=(0, 2)).cpu()  # mean over images and queries -> (H,)
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return torch.stack(result)
