"""Attention masks shared by every projection-free attention in the suite (paper Eq. 7).

One convention throughout, the one of ``F.scaled_dot_product_attention``: a mask is either a boolean
tensor (True = may attend) or a float tensor added to the logits (-inf = may not attend), broadcastable
to (B, H, N, N). For a kernel K that is "multiply K by the 0/1 mask" (Eq. 7), or K * exp(mask).
"""
import math
from typing import Optional, Tuple

import torch


def resolve_grid(
        n: int,
        grid_size: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: Optional[int] = None,
) -> Tuple[int, int, int]:
    """(num_prefix_tokens, grid_h, grid_w) for a sequence of ``n`` tokens.

    The model sets ``grid_size`` / ``num_prefix_tokens`` on its attention layers; when they do not
    match ``n`` (another input size) the grid is taken to be square with the remainder as prefix tokens.
    """
    if grid_size is not None and num_prefix_tokens is not None:
        if num_prefix_tokens + grid_size[0] * grid_size[1] == n:
            return num_prefix_tokens, grid_size[0], grid_size[1]
    side = math.isqrt(n)
    prefix = n - side * side
    if num_prefix_tokens is not None and prefix != num_prefix_tokens:
        side = math.isqrt(max(n - num_prefix_tokens, 0))
        prefix = num_prefix_tokens
        if prefix + side * side != n:
            raise ValueError(
                f'window_2d: cannot place {n} tokens on a square patch grid with {num_prefix_tokens} prefix '
                f'tokens; set grid_size on the attention layer')
    return prefix, side, side


def window_1d_mask(n: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """The paper's sliding window over token index: i - W < j <= i (causal) or |i - j| < W."""
    idx = torch.arange(n, device=device)
    diff = idx[:, None] - idx[None, :]  # i - j
    if causal:
        return (diff >= 0) & (diff < window)
    return diff.abs() < window


def window_2d_mask(n: int, radius: int, grid_size=None, num_prefix_tokens=None, device=None) -> torch.Tensor:
    """Patch tokens see patches within a square (Chebyshev) ``radius`` on the patch grid; prefix tokens
    (class, register) see and are seen by every token."""
    prefix, gh, gw = resolve_grid(n, grid_size, num_prefix_tokens)
    pos = torch.arange(gh * gw, device=device)
    row, col = pos // gw, pos % gw
    near = ((row[:, None] - row[None, :]).abs() <= radius) & ((col[:, None] - col[None, :]).abs() <= radius)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[prefix:, prefix:] = near
    return mask


def build_mask(
        n: int,
        device=None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        window: Optional[int] = None,
        window_2d: Optional[int] = None,
        grid_size: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """Combine causal / 1-D window / 2-D window / a caller's ``attn_mask`` into one SDPA-style mask.

    Returns None when nothing is masked. A boolean result is (N, N) or (B, 1|H, N, N); a float
    ``attn_mask`` yields a float (additive) result with the structural masks folded in as -inf.
    """
    structural = None
    if window is not None:
        structural = window_1d_mask(n, window, is_causal, device)
    elif is_causal:
        structural = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if window_2d is not None:
        near = window_2d_mask(n, window_2d, grid_size, num_prefix_tokens, device)
        structural = near if structural is None else structural & near
    if attn_mask is None:
        return structural
    if attn_mask.dim() == 3:  # timm / nn.MultiheadAttention style (B, N, N)
        attn_mask = attn_mask.unsqueeze(1)
    if structural is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_mask & structural
    return attn_mask.masked_fill(~structural, float('-inf'))


def empty_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean (..., N, 1): rows in which every key is masked out, or None if there cannot be any."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > float('-inf')
    return ~keep.any(dim=-1, keepdim=True)


def open_empty_rows(mask: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Unmask fully-masked rows so that fused kernels stay finite; callers zero those rows' output."""
    if mask.dtype == torch.bool:
        return mask | empty
    return mask.masked_fill(empty, 0.0)
