"""Attention masks shared by every projection-free attention in the suite (paper Eq. 7).

One convention throughout, the one of ``F.scaled_dot_product_attention``: a mask is either a boolean
tensor (True = may attend) or a float tensor added to the logits (-inf = may not attend), broadcastable
to (B, H, N, N). For a kernel K that is "multiply K by the 0/1 mask" (Eq. 7), or K * exp(mask).
"""
import math
from typing import Callable, Optional, Tuple

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


def structural_mask_mod(
        n: int,
        is_causal: bool = False,
        window: Optional[int] = None,
        window_2d: Optional[int] = None,
        grid_size: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: Optional[int] = None,
) -> Optional[Callable]:
    """The causal / window masks as one ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (None if unmasked).

    The same function builds dense masks (evaluated on index grids, ``dense_mask``) and FlexAttention
    ``BlockMask``s, so each mask is defined once:
    * causal: j <= i;  1-D window W (the paper's Eq. 7): i - W < j <= i when causal, else |i - j| < W;
    * 2-D window of radius r: patch tokens see patches within Chebyshev distance r on the patch grid;
      prefix tokens (class, register) see and are seen by every token.
    """
    if not is_causal and window is None and window_2d is None:
        return None
    prefix, grid_w = 0, 1  # always bound: torch.compile breaks the graph on unset closure cells
    if window_2d is not None:
        prefix, _, grid_w = resolve_grid(n, grid_size, num_prefix_tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        keep = (diff >= 0) if is_causal else (diff == diff)
        if window is not None:
            keep = keep & ((diff < window) if is_causal else (diff.abs() < window))
        if window_2d is not None:
            pq, pk = q_idx - prefix, kv_idx - prefix
            near = ((pq // grid_w - pk // grid_w).abs() <= window_2d) & ((pq % grid_w - pk % grid_w).abs() <= window_2d)
            keep = keep & ((q_idx < prefix) | (kv_idx < prefix) | near)
        return keep

    return mask_mod


def dense_mask(mask_mod: Callable, n: int, device=None) -> torch.Tensor:
    """Evaluate a ``mask_mod`` on all (query, key) pairs: a boolean (N, N) tensor."""
    idx = torch.arange(n, device=device)
    return mask_mod(None, None, idx[:, None], idx[None, :])


def window_1d_mask(n: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """The paper's sliding window over token index as a dense (N, N) mask."""
    return dense_mask(structural_mask_mod(n, causal, window), n, device)


def window_2d_mask(n: int, radius: int, grid_size=None, num_prefix_tokens=None, device=None) -> torch.Tensor:
    """The 2-D patch-grid neighbourhood of ``radius`` as a dense (N, N) mask."""
    return dense_mask(structural_mask_mod(n, window_2d=radius, grid_size=grid_size,
                                          num_prefix_tokens=num_prefix_tokens), n, device)


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
    mask_mod = structural_mask_mod(n, is_causal, window, window_2d, grid_size, num_prefix_tokens)
    structural = None if mask_mod is None else dense_mask(mask_mod, n, device)
    if attn_mask is None:
        return structural
    if attn_mask.dim() == 3:  # timm / nn.MultiheadAttention style (B, N, N)
        attn_mask = attn_mask.unsqueeze(1)
    if structural is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_mask & structural
    return attn_mask.masked_fill(~structural, float('-inf'))


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as logits to add in ``dtype``: a boolean mask becomes 0 (attend) / -inf (not); a float one is cast."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float('-inf'))


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


def check_attn_mask(attn_mask: Optional[torch.Tensor], batch: int, heads: int, n: int) -> None:
    """A one-line ``ValueError`` unless ``attn_mask`` is None or a boolean / float mask of a shape the layers take:
    (N, N), (B, N, N) or (B, 1|H, N, N), where B may also be 1."""
    if attn_mask is None:
        return
    shape = tuple(attn_mask.shape)
    fits = (attn_mask.dim() in (2, 3, 4) and shape[-2:] == (n, n)
            and (attn_mask.dim() < 3 or shape[0] in (1, batch))
            and (attn_mask.dim() < 4 or shape[1] in (1, heads)))
    if not fits:
        raise ValueError(f'attn_mask of shape {shape} does not fit {batch} x {n} tokens and {heads} heads: give '
                         f'(N, N), (B, N, N) or (B, 1|H, N, N) with B = {batch}, H = {heads}, N = {n}')
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f'attn_mask must be boolean (True = attend) or float (added to the logits), '
                         f'got {attn_mask.dtype}')
