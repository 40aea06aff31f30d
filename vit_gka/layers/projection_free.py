"""The projection-free attention layer that GKA and the compact kernels share.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu et al., arXiv 2605.02144 (2026).
The head slices x of the LayerNorm'd tokens are queries, keys and values at once (no W_Q, W_K, W_V); each
head has one learnable bandwidth, and the heads meet again in the single output projection W_O. A
subclass supplies the kernel: its ``forward`` and ``head_weights`` (its materialised weights, for analysis).
"""
import abc
import contextlib
import math
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn as nn

from vit_gka.layers.masks import build_mask, resolve_grid, structural_mask_mod

torch.fx.wrap('build_mask')  # a node of a traced graph: its grid arithmetic needs the concrete length

__all__ = ['ProjectedHeads', 'ProjectionFreeAttention', 'no_autocast']


def no_autocast(device: torch.device):
    """Autocast off on ``device`` (materialised weights stay float32-accurate under mixed precision)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class ProjectedHeads(nn.Module):
    """What every attention layer here shares with timm's ``Attention``: timm's ``attn_layer`` keyword contract
    (the one place it is written), the split into heads, attention dropout, the optional scale norm and the
    output projection W_O (with ``proj_drop``). ``qkv_bias`` and ``qk_norm`` are kept for the layers that
    project queries and keys (VLT); the projection-free ones ignore them."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.dd = {'device': device, 'dtype': dtype}
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.norm_layer = norm_layer
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **self.dd) if scale_norm and norm_layer is not None else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **self.dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def dropout_p(self) -> float:
        """The attention dropout probability of this call (0 in eval mode)."""
        return self.attn_drop.p if self.training else 0.0

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H * d) -> (B, H, N, d), a view."""
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Concatenated heads (B, N, H * d) -> scale norm -> W_O -> proj_drop."""
        return self.proj_drop(self.proj(self.norm(tokens)))

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> concatenated heads -> ``project``, (B, N, H * d)."""
        B, H, N, d = out.shape
        return self.project(out.transpose(1, 2).reshape(B, N, H * d))


class ProjectionFreeAttention(ProjectedHeads, abc.ABC):
    """Base of the projection-free kernel attentions, a timm ``attn_layer``.

    Holds the head split and W_O (``ProjectedHeads``, with timm's keywords), one bandwidth per head
    (``log_sigma``, initialised to ``sigma_init`` or ``default_sigma(head_dim)``) and the structural masks:
    ``window`` (the paper's 1-D sliding window, Eq. 7), ``window_2d`` (a radius on the patch grid) with the grid
    they need (``grid_size``, ``num_prefix_tokens``: set by the model, inferred as square when unset).

    A subclass writes ``forward(x, attn_mask=None, is_causal=False)`` and ``head_weights`` (its materialised
    weights); ``weights(...)`` gives the (B, H, N, N) weights with every mask applied, for analysis.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            window: Optional[int] = None,
            window_2d: Optional[int] = None,
            sigma_init: Optional[float] = None,
            default_sigma: Callable[[int], float],
            **timm_args,
    ) -> None:
        super().__init__(dim, num_heads, **timm_args)
        if window is not None and window <= 0:
            raise ValueError(f'window must be a positive number of tokens, got {window}')
        if window_2d is not None and window_2d < 0:
            raise ValueError(f'window_2d must be a radius >= 0 in patches, got {window_2d}')
        if sigma_init is not None and not sigma_init > 0:
            raise ValueError(f'sigma_init must be > 0, got {sigma_init}')
        self.window = window
        self.window_2d = window_2d
        self.sigma_init = default_sigma(self.head_dim) if sigma_init is None else float(sigma_init)
        self.grid_size: Optional[Tuple[int, int]] = None
        self.num_prefix_tokens: Optional[int] = None
        self._block_masks = {}
        self.log_sigma = nn.Parameter(torch.full((num_heads,), math.log(self.sigma_init), **self.dd))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    @property
    def windowed(self) -> bool:
        return self.window is not None or self.window_2d is not None

    def masked(self, attn_mask: Optional[torch.Tensor], is_causal: bool) -> bool:
        """Whether any mask applies to this call."""
        return attn_mask is not None or is_causal or self.windowed

    def grid(self, n: int) -> Tuple[int, int, int]:
        """(prefix tokens, grid rows, grid columns) of ``n`` tokens (``masks.resolve_grid``)."""
        return resolve_grid(n, self.grid_size, self.num_prefix_tokens)

    def mask(self, n: int, device, attn_mask: Optional[torch.Tensor] = None,
             is_causal: bool = False) -> Optional[torch.Tensor]:
        """The dense SDPA-style mask (``vit_gka.layers.masks``) this layer applies to ``n`` tokens, or None."""
        return build_mask(n, device, attn_mask, is_causal, self.window, self.window_2d, self.grid_size,
                          self.num_prefix_tokens)

    def block_mask(self, n: int, device: torch.device, is_causal: bool):
        """FlexAttention BlockMask of the causal / window masks, built once per length, device and grid."""
        key = (n, str(device), is_causal, self.grid_size, self.num_prefix_tokens)
        if key not in self._block_masks:
            mask_mod = structural_mask_mod(
                n, is_causal, self.window, self.window_2d, self.grid_size, self.num_prefix_tokens)
            if mask_mod is None:
                self._block_masks[key] = None
            else:
                from torch.nn.attention.flex_attention import create_block_mask
                self._block_masks[key] = create_block_mask(mask_mod, None, None, n, n, device=device)
        return self._block_masks[key]

    @abc.abstractmethod
    def head_weights(self, heads: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Materialised weights (B, H, N, N) on heads (B, H, N, d) under the dense ``mask``, no dropout."""

    def weights(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """The (B, H, N, N) attention weights this layer applies to tokens x (B, N, D), masks (causal,
        windows, ``attn_mask``) applied; in float32 at least with autocast off, no dropout. Fully masked
        rows are zeros."""
        mask = self.mask(x.shape[1], x.device, attn_mask, is_causal)
        with no_autocast(x.device):
            return self.head_weights(self.split_heads(x), mask)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, window={self.window}, window_2d={self.window_2d}'
