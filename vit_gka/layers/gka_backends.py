"""Fast GKA: the paper's operator (``vit_gka.layers.gka``) through fused attention kernels.

The identity ||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j leaves, after the row normalisation
cancels the ||x_i||^2 term,

    W_ij = softmax_j( x_i.x_j / sigma^2 - ||x_j||^2 / (2 sigma^2) ),

scaled-dot-product attention with q = x / sigma^2, k = v = x, scale 1 and a per-key bias. PyTorch's fused
SDPA kernels (flash / memory-efficient) and FlexAttention then do the work without an N x N tensor.
Backends: ``sdpa_pad`` (bias folded into a padded extra dimension), ``sdpa_bias`` (bias as an additive
mask), ``flex`` (bias in a score_mod, windows as block-sparse BlockMasks); ``auto`` picks per call. The
project's own Triton kernels, which need none of these tricks, are in ``gka_triton``.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vit_gka.layers.masks import additive, empty_rows, open_empty_rows

__all__ = ['GKA_IMPLS', 'auto_impl', 'check_impl', 'gka_flex', 'gka_sdpa_bias', 'gka_sdpa_pad',
           'key_norm_bias', 'scaled_queries']

GKA_IMPLS = ('auto', 'sdpa_pad', 'sdpa_bias', 'flex', 'triton', 'reference')


def check_impl(impl: str, attn_drop: float, impls: Tuple[str, ...] = GKA_IMPLS, why: str = '') -> str:
    """``impl`` validated against ``impls`` (``"fused"`` is a name for ``"auto"``); ``why`` explains a refusal."""
    impl = 'auto' if impl == 'fused' else impl
    if impl not in impls:
        raise ValueError(f'impl={impl!r} is not one of {impls}{why}')
    if impl in ('flex', 'triton') and attn_drop > 0:
        raise ValueError(f'impl="{impl}" has no attention dropout; use attn_drop=0 or another impl')
    return impl


def key_norm_bias(
        x: torch.Tensor, log_sigma: torch.Tensor, dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1 / sigma^2 as (1, H, 1, 1) in float32 at least, b_j = -||x_j||^2 / (2 sigma^2) as (B, H, N) in dtype).

    b is accumulated in float32 (``vector_norm(dtype=...)`` reads x once and builds no x**2 temporary).
    For a 16-bit x, 1 / sigma^2 is first rounded to x's dtype: the queries are scaled by that value in one
    pass over x (``scaled_queries``), and the bias uses the same value, so the logits are exactly a Gaussian
    kernel of that (0.2% rounded) bandwidth. For a 16-bit dtype (default: x's) b is shifted by its maximum
    over keys (the softmax is invariant to a per-row constant) and clamped, so per-head norms of 1e3 stay
    finite; in float32 the fused kernels' own running max already does that, and the two extra passes are
    skipped.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    dtype = x.dtype if dtype is None else dtype
    inv_var = torch.exp(-2.0 * log_sigma.to(acc)).view(1, -1, 1, 1)
    if x.dtype != acc:
        inv_var = inv_var.to(x.dtype).to(acc)
    bias = torch.linalg.vector_norm(x, dim=-1, dtype=acc).square() * (-0.5 * inv_var.squeeze(-1))
    if torch.finfo(dtype).bits < 32:
        bias = bias - bias.amax(dim=-1, keepdim=True).detach()
        bias = bias.clamp_min(torch.finfo(dtype).min / 2)
    return inv_var, bias.to(dtype)


def scaled_queries(x: torch.Tensor, inv_var: torch.Tensor) -> torch.Tensor:
    """q = x / sigma^2 per head in x's dtype, one pass over x (``key_norm_bias`` rounded 1 / sigma^2 to it)."""
    return x * inv_var.to(x.dtype)


def gka_sdpa_pad(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
        width: Optional[int] = None,
        narrow_v: bool = False,
) -> torch.Tensor:
    """GKA through ``F.scaled_dot_product_attention``, the key-norm bias folded into the head width.

    q' = [x / sigma^2, 1, ..., 1] and k' = [x, b, 0, ..., 0], padded up to ``width`` (default: the next
    multiple of 8 above d), so q'.k' = x.x / sigma^2 + b: q' is one multiply and one pad of x, k' one
    concatenation. v' is k' itself and the output's extra columns are dropped (equal head widths keep the CPU
    on its flash kernel with or without a mask, where an additive (B, H, N, N) bias would be materialised as
    soon as a mask is combined with it; on CUDA the same inputs reach cuDNN, FlashAttention and the memory-
    efficient kernel), or with ``narrow_v`` v = x at the head's own width (off by default: on an H100 it wins only
    on contiguous heads and loses in the layer, whose heads are a strided view of the tokens; docs/benchmarks.md). Heads x (B, H, N, d). Rows whose keys are all masked are returned as zeros.
    """
    head_dim = x.shape[-1]
    width = 8 * math.ceil((head_dim + 1) / 8) if width is None else width
    extra = width - head_dim
    inv_var, bias = key_norm_bias(x, log_sigma)
    q = F.pad(scaled_queries(x, inv_var), (0, extra), value=1.0)
    k = torch.cat([x, F.pad(bias.unsqueeze(-1), (0, extra - 1))], dim=-1)

    empty = empty_rows(mask)
    if empty is not None:
        mask = open_empty_rows(mask, empty)
    out = F.scaled_dot_product_attention(q, k, x if narrow_v else k, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    out = out if narrow_v else out[..., :head_dim]
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out


def gka_sdpa_bias(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """GKA through SDPA with the key-norm bias as an additive mask; heads x (B, H, N, d).

    q = x / sigma^2, k = v = x at the head's own width, and attn_mask = b_j broadcast over queries with
    stride 0 (no N x N tensor while unmasked; a mask has to be folded in, which materialises
    (B, H, N, N)). CUDA runs it on the memory-efficient kernel (FlashAttention takes no bias).
    """
    inv_var, bias = key_norm_bias(x, log_sigma)
    bias = bias.unsqueeze(-2)  # (B, H, 1, N)
    empty = empty_rows(mask)
    if mask is None:
        attn_bias = bias.expand(*bias.shape[:-2], x.shape[-2], x.shape[-2])
    else:
        mask = open_empty_rows(mask, empty)
        attn_bias = bias + additive(mask, x.dtype)
    q = scaled_queries(x, inv_var)
    out = F.scaled_dot_product_attention(q, x, x, attn_mask=attn_bias, dropout_p=dropout_p, scale=1.0)
    return out if empty is None else out.masked_fill(empty, 0.0)


def gka_flex(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        block_mask=None,
        attn_mask: Optional[torch.Tensor] = None,
        compiled: Optional[bool] = None,
) -> torch.Tensor:
    """GKA through FlexAttention; heads x (B, H, N, d). No dropout (flex has none).

    The key-norm bias goes in a ``score_mod``; causal and window masks come as a ``BlockMask``
    (``ProjectionFreeAttention.block_mask``), so blocks that are masked out entirely are skipped, not
    computed. A dense ``attn_mask`` (boolean or additive) is applied in the ``score_mod``. Rows whose keys
    are all masked return zeros. ``compiled`` (default: on CUDA only) wraps flex in torch.compile, without
    which flex runs an unfused eager path that materialises the scores; CPU flex has no backward in
    torch 2.14, so on the CPU it is a forward-only correctness path.
    """
    from torch.nn.attention.flex_attention import flex_attention
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_var, bias = key_norm_bias(x, log_sigma, acc)  # bias (B, H, N)
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(1) if attn_mask.dim() == 3 else attn_mask  # (B, N, N) as timm gives it
        extra = additive(attn_mask, acc).expand(x.shape[0], x.shape[1], x.shape[2], x.shape[2])

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score + bias[b, h, kv_idx]
        return score if attn_mask is None else score + extra[b, h, q_idx, kv_idx]

    compiled = x.device.type == 'cuda' if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    q = scaled_queries(x, inv_var)
    out = fn(q, x, x, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return torch.nan_to_num(out, nan=0.0) if attn_mask is not None else out


_COMPILED_FLEX = []


def _compiled_flex():
    """flex_attention is only fused when compiled; compile it once per process."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


def auto_impl(x: torch.Tensor, masked: bool, windowed: bool = False, dropout: bool = False) -> str:
    """The fastest correct fused backend for this call, chosen by measurement (docs/benchmarks.md).

    CPU: the additive bias when nothing is masked (the faster of the two there); with a mask the bias would
    be materialised as (B, H, N, N), so pad. Flex is never chosen on the CPU (no backward there, and it
    needs a compile per shape).
    CUDA (H100, bf16): the padded form (cuDNN's fused kernel; an additive bias reaches only the memory-
    efficient kernel and, in training, a (B, H, N, N) bias gradient), except for windows without gradients:
    there FlexAttention skips the masked blocks and beats the padded form, while its backward, which
    accumulates the bias gradient, is slower than the padded form's (docs/benchmarks.md has the ratios).
    ``triton`` (``gka_triton``) is never picked: no GPU has measured it against ``sdpa_pad``; ask for it with
    ``impl="triton"``.
    """
    if x.device.type == 'cpu':
        return 'sdpa_pad' if masked else 'sdpa_bias'
    if windowed and not dropout and not (torch.is_grad_enabled() and x.requires_grad):
        return 'flex'
    return 'sdpa_pad'
