"""GKA with data-dependent bandwidths: one bandwidth per token and head instead of one per head.

GKA (``vit_gka.layers.gka``; Kundu et al., arXiv 2605.02144, whose future work this is) learns one bandwidth per
head. Here the bandwidth also depends on a token's own head slice x (the LayerNorm'd tokens, no projection), through
a_h in R^d per head (``log_sigma_proj``, initialised to 0: a fresh layer is GKA exactly):

    log sigma_i = log_sigma_h + a_h . x_i
    per query:  K_ij = exp(-||x_i - x_j||^2 / (2 sigma_i^2))     (each query its own width: a "balloon" estimator)
    per key:    K_ij = exp(-||x_i - x_j||^2 / (2 sigma_j^2))     (each key its own width: a "sample-point" one)
    W_ij = K_ij / (sum_j' K_ij' + eps),   y_i = sum_j W_ij x_j     (GKA's Eq. 4-5; masks multiply K, Eq. 7)

The fast form is GKA's identity ||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j: scale-1 softmax attention with
v = x on heads widened by two columns, whose scores q'_i.k'_j are the whole exponent -||x_i - x_j||^2 / (2 sigma^2):
* per query:  q'_i = [x_i / sigma_i^2, -1 / (2 sigma_i^2), -||x_i||^2 / (2 sigma_i^2)],  k'_j = [x_j, ||x_j||^2, 1]
* per key:    q'_i = [x_i, ||x_i||^2, 1],  k'_j = [x_j / sigma_j^2, -1 / (2 sigma_j^2), -||x_j||^2 / (2 sigma_j^2)]
Per key the ||x_i||^2 term is divided by sigma_j^2 and must be there. Per query it is constant in row i and cancels in
the normalisation, so q'_i = [x_i / sigma_i^2, -1 / (2 sigma_i^2)], k'_j = [x_j, ||x_j||^2] (width d + 1) gives the
same weights; the third column is kept because it makes the float32 gradients as accurate as the materialised form's:
without it the backward multiplies sum_j dS_ij (0 exactly, ~1e-7 relative in float32) by the row constant
||x_i||^2 / (2 sigma_i^2), and d log_sigma loses several times the accuracy of the materialised form (GKA's own fused
form has the same loss; tests/test_bandwidths.py holds the third-column form to 1e-5). After padding to a multiple of 8 it costs nothing unless d = 7 (mod 8).
With eps = 0 both equal the materialised form; as in GKA the diagonal is exp(0) = 1 in every row that may attend to
itself, so eps changes nothing measurable there, and rows with every key masked out return zeros. (Where the diagonal
is masked out and every allowed K_ij is below eps, or underflows, the materialised form returns a row of ~zeros; the
fused form returns the exact softmax.)

``impl``: ``"sdpa_pad"`` (q', k' zero-padded to a multiple of 8, v padded alike, so the CPU stays on its flash kernel
and CUDA reaches cuDNN / FlashAttention), ``"sdpa"`` (q', k' at their own width d + 2 and v = x: the operator as
written, what FLOP counting runs; SDPA's math kernel on the CPU), ``"flex"`` (FlexAttention: q or k scaled by
1 / sigma^2, the two norm columns in a score_mod, windows as block-sparse BlockMasks), ``"reference"`` (the materialised
N x N kernel, the oracle) and ``"auto"`` (GKA's choice, ``gka_backends.auto_impl``, without its additive-bias form:
these logits have no per-key bias, so ``"sdpa_bias"`` does not exist here).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_gka.layers.gka import apply_mask, default_sigma, pairwise_sq_dist, row_normalise
from vit_gka.layers.gka_backends import _compiled_flex, auto_impl, check_impl
from vit_gka.layers.masks import additive, check_attn_mask, empty_rows, open_empty_rows
from vit_gka.layers.projection_free import ProjectionFreeAttention

__all__ = ['BANDWIDTHS', 'BANDWIDTH_IMPLS', 'VariableBandwidthAttention', 'key_bandwidth_qk', 'log_bandwidths',
           'query_bandwidth_qk', 'variable_flex', 'variable_kernel', 'variable_reference', 'variable_sdpa',
           'variable_weights']

BANDWIDTHS = ('query', 'key')
BANDWIDTH_IMPLS = ('auto', 'sdpa_pad', 'sdpa', 'flex', 'reference')
EXTRA_COLUMNS = 2  # columns the bandwidth terms add to the head width d


def log_bandwidths(x: torch.Tensor, log_sigma: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """log sigma_i = log_sigma_h + a_h . x_i: heads x (B, H, N, d), log_sigma (H,), a = ``proj`` (H, d) -> (B, H, N),
    in float32 at least. The projection is a matmul (N x d multiply-accumulates per head, as FLOP counting sees it)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return log_sigma.to(acc).view(-1, 1) + (x @ proj.to(x.dtype).unsqueeze(-1)).squeeze(-1).to(acc)


# ------------------------------------------------------------------------- the definition (the oracle)

def variable_kernel(sq_dist: torch.Tensor, log_s: torch.Tensor, bandwidth: str) -> torch.Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)) with sigma = sigma_i (``"query"``: per row) or sigma_j (``"key"``:
    per column), sigma = exp(log_s), log_s (B, H, N); sq_dist (B, H, N, N)."""
    inv_two_var = 0.5 * torch.exp(-2.0 * log_s)
    inv_two_var = inv_two_var.unsqueeze(-1) if bandwidth == 'query' else inv_two_var.unsqueeze(-2)
    return torch.exp(-sq_dist * inv_two_var)


def variable_weights(
        x: torch.Tensor, log_sigma: torch.Tensor, proj: torch.Tensor, bandwidth: str,
        mask: Optional[torch.Tensor] = None, eps: float = 1e-6,
) -> torch.Tensor:
    """W_ij = K_ij / (sum_j' K_ij' + eps) (B, H, N, N) on heads x (B, H, N, d), masks multiplying K (GKA's Eq. 7),
    in float32 at least. Fully masked rows are zeros."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    kernel = variable_kernel(pairwise_sq_dist(xf), log_bandwidths(xf, log_sigma, proj), bandwidth)
    return row_normalise(apply_mask(kernel, mask), eps)


def variable_reference(
        x: torch.Tensor, log_sigma: torch.Tensor, proj: torch.Tensor, bandwidth: str,
        mask: Optional[torch.Tensor] = None, eps: float = 1e-6, dropout_p: float = 0.0,
) -> torch.Tensor:
    """y_i = sum_j W_ij x_j with the materialised weights; heads x (B, H, N, d) -> (B, H, N, d) in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    weights = F.dropout(variable_weights(xf, log_sigma, proj, bandwidth, mask, eps), p=dropout_p,
                        training=dropout_p > 0)
    return (weights @ xf).to(x.dtype)


# ------------------------------------------------------------------------------------ the fused form

def _widen(main: torch.Tensor, columns: torch.Tensor, width: Optional[int]) -> torch.Tensor:
    """[main, columns, 0, ..., 0] with ``width`` columns in all (None: no zeros), in main's dtype."""
    columns = columns.to(main.dtype)
    if width is not None:
        columns = F.pad(columns, (0, width - main.shape[-1] - columns.shape[-1]))
    return torch.cat([main, columns], dim=-1)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_j||^2 as (B, H, N, 1), accumulated in float32 at least (as GKA's key-norm bias)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square()


def query_bandwidth_qk(x: torch.Tensor, log_s: torch.Tensor, width: Optional[int] = None):
    """Per query: q'_i = [x_i / sigma_i^2, -1 / (2 sigma_i^2), -||x_i||^2 / (2 sigma_i^2)], k'_j = [x_j, ||x_j||^2, 1],
    so q'_i.k'_j = (x_i.x_j - ||x_j||^2 / 2 - ||x_i||^2 / 2) / sigma_i^2 = -||x_i - x_j||^2 / (2 sigma_i^2). (The last
    column is a row constant, which the normalisation cancels; it is there for float32 gradients, module docstring.)"""
    inv_var = torch.exp(-2.0 * log_s).unsqueeze(-1)
    sq = _sq_norms(x)
    q = _widen(x * inv_var.to(x.dtype), torch.cat([-0.5 * inv_var, -0.5 * inv_var * sq], dim=-1), width)
    k = _widen(x, torch.cat([sq, torch.ones_like(sq)], dim=-1), width)
    return q, k


def key_bandwidth_qk(x: torch.Tensor, log_s: torch.Tensor, width: Optional[int] = None):
    """Per key: q'_i = [x_i, ||x_i||^2, 1], k'_j = [x_j / sigma_j^2, -1 / (2 sigma_j^2), -||x_j||^2 / (2 sigma_j^2)], so
    that q'_i.k'_j = (x_i.x_j - ||x_i||^2 / 2 - ||x_j||^2 / 2) / sigma_j^2 = -||x_i - x_j||^2 / (2 sigma_j^2)."""
    inv_var = torch.exp(-2.0 * log_s).unsqueeze(-1)
    sq = _sq_norms(x)
    q = _widen(x, torch.cat([sq, torch.ones_like(sq)], dim=-1), width)
    k = _widen(x * inv_var.to(x.dtype), torch.cat([-0.5 * inv_var, -0.5 * inv_var * sq], dim=-1), width)
    return q, k


WIDENED_QK = {'query': query_bandwidth_qk, 'key': key_bandwidth_qk}


def _sdpa_zero_empty_rows(q, k, v, mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """softmax(q.k^T + mask) v at scale 1; rows whose keys are all masked return zeros (GKA's rule)."""
    empty = empty_rows(mask)
    if empty is not None:
        mask = open_empty_rows(mask, empty)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    return out if empty is None else out.masked_fill(empty, 0.0)


def variable_sdpa(
        x: torch.Tensor, log_sigma: torch.Tensor, proj: torch.Tensor, bandwidth: str,
        mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, pad: bool = True,
) -> torch.Tensor:
    """The fused form through ``F.scaled_dot_product_attention``; heads x (B, H, N, d) -> (B, H, N, d).

    ``pad``: q', k' and v zero-padded to the next multiple of 8 at or above d + 2: equal head widths
    keep the CPU on its flash kernel, with or without a mask (per query v is k' itself, whose first d columns are x;
    per key v = [x, 0, ...]); the output's extra columns are dropped. Without it q', k' keep their own width and
    v = x (the operator as written; SDPA's math kernel on the CPU)."""
    head_dim = x.shape[-1]
    width = 8 * math.ceil((head_dim + EXTRA_COLUMNS) / 8) if pad else None
    q, k = WIDENED_QK[bandwidth](x, log_bandwidths(x, log_sigma, proj), width)
    if not pad:
        return _sdpa_zero_empty_rows(q, k, x, mask, dropout_p)
    v = k if bandwidth == 'query' else F.pad(x, (0, width - head_dim))
    return _sdpa_zero_empty_rows(q, k, v, mask, dropout_p)[..., :head_dim]


def variable_flex(
        x: torch.Tensor, log_sigma: torch.Tensor, proj: torch.Tensor, bandwidth: str,
        block_mask=None, attn_mask: Optional[torch.Tensor] = None, compiled: Optional[bool] = None,
) -> torch.Tensor:
    """The fused form through FlexAttention; heads x (B, H, N, d). No dropout (flex has none).

    The d-wide part of q'.k' is flex's own q.k (per query q = x / sigma_i^2, k = x; per key q = x, k = x / sigma_j^2),
    the two norm columns go in a ``score_mod``: + (-1 / (2 sigma^2)) (||x_i||^2 + ||x_j||^2), sigma = sigma_i per
    query, sigma_j per key. Causal / window masks come as a ``BlockMask``, a dense ``attn_mask`` is added in the
    score_mod, fully masked rows return zeros. ``compiled`` as in ``gka_flex`` (default: on CUDA only; CPU flex has
    no backward in torch 2.14)."""
    from torch.nn.attention.flex_attention import flex_attention
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_var = torch.exp(-2.0 * log_bandwidths(x, log_sigma, proj))  # (B, H, N)
    half = -0.5 * inv_var
    sq = _sq_norms(x).squeeze(-1)
    scaled = x * inv_var.unsqueeze(-1).to(x.dtype)
    if attn_mask is not None:
        extra = additive(attn_mask, acc).expand(x.shape[0], x.shape[1], x.shape[2], x.shape[2])

    def score_mod(score, b, h, q_idx, kv_idx):
        scale = half[b, h, q_idx] if bandwidth == 'query' else half[b, h, kv_idx]
        score = score + scale * (sq[b, h, q_idx] + sq[b, h, kv_idx])
        return score if attn_mask is None else score + extra[b, h, q_idx, kv_idx]

    compiled = x.device.type == 'cuda' if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    q, k = (scaled, x) if bandwidth == 'query' else (x, scaled)
    out = fn(q, k, x, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return torch.nan_to_num(out, nan=0.0) if attn_mask is not None else out


# ------------------------------------------------------------------------------------------- the layer

class VariableBandwidthAttention(ProjectionFreeAttention):
    """GKA with a bandwidth per query (``bandwidth="query"``) or per key (``"key"``), a timm ``attn_layer``.

    Args: those of ``GaussianKernelAttention`` (timm's, ``impl``, ``window``, ``window_2d``, ``sigma_init``, ``eps``;
    all but ``dim`` and ``num_heads`` as keywords), and ``bandwidth``: ``"query"`` (sigma_i from the query token, the
    ``gka_q`` models) or ``"key"`` (sigma_j from the key token, ``gka_k``). ``impl``: ``"auto"``, ``"sdpa_pad"``,
    ``"sdpa"``, ``"flex"``, ``"reference"`` (module docstring); ``"sdpa_bias"`` does not exist here.

    Parameters: GKA's ``log_sigma`` (H,) (the bandwidth of a token x = 0, initialised as GKA's) and ``log_sigma_proj``
    (H, d), the a_h of log sigma_i = log_sigma_h + a_h . x_i, initialised to 0 (so the layer starts as GKA): H * d
    parameters more than GKA, D per block. ``forward(x, attn_mask=None, is_causal=False)`` as timm's ``Attention``;
    ``attn_mask`` boolean (True = attend) or additive, (N, N), (B, N, N) or (B, 1|H, N, N); anything else, or tokens
    that are not (B, N, D), is a one-line ``ValueError``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            bandwidth: str = 'query',
            impl: str = 'auto',
            window: Optional[int] = None,
            window_2d: Optional[int] = None,
            sigma_init: Optional[float] = None,
            eps: float = 1e-6,
            **timm_args,
    ) -> None:
        if bandwidth not in BANDWIDTHS:
            raise ValueError(f'bandwidth={bandwidth!r} is not one of {BANDWIDTHS}')
        impl = check_impl(impl, timm_args.get('attn_drop', 0.), BANDWIDTH_IMPLS,
                          ' (data-dependent bandwidths have no additive-bias form)' if impl == 'sdpa_bias' else '')
        super().__init__(dim, num_heads, window=window, window_2d=window_2d, sigma_init=sigma_init,
                         default_sigma=default_sigma, **timm_args)
        self.bandwidth = bandwidth
        self.impl = impl
        self.eps = eps
        self.log_sigma_proj = nn.Parameter(torch.zeros(num_heads, self.head_dim, **self.dd))

    def extra_repr(self) -> str:
        return (f'bandwidth={self.bandwidth}, heads={self.num_heads}, impl={self.impl}, window={self.window}, '
                f'window_2d={self.window_2d}')

    def _check(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> None:
        dim = self.num_heads * self.head_dim
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f'{type(self).__name__} takes tokens (B, N, {dim}), got shape {tuple(x.shape)}')
        check_attn_mask(attn_mask, x.shape[0], self.num_heads, x.shape[1])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        self._check(x, attn_mask)
        return self.merge_heads(self.core(self.split_heads(x), attn_mask, is_causal))

    def weights(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        self._check(x, attn_mask)
        return super().weights(x, attn_mask, is_causal)

    def core(self, heads: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        n, dropout_p, impl = heads.shape[-2], self.dropout_p, self.impl
        args = (heads, self.log_sigma, self.log_sigma_proj, self.bandwidth)
        if impl == 'auto':  # GKA's choice; masked=True: there is no additive-bias form to pick here
            impl = auto_impl(heads, masked=True, windowed=self.windowed, dropout=dropout_p > 0)
        if impl == 'flex':
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(1)
            return variable_flex(*args, self.block_mask(n, heads.device, is_causal), attn_mask)
        mask = self.mask(n, heads.device, attn_mask, is_causal)
        if impl == 'reference':
            return variable_reference(*args, mask, self.eps, dropout_p)
        return variable_sdpa(*args, mask, dropout_p, pad=impl == 'sdpa_pad')

    def head_weights(self, heads: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return variable_weights(heads, self.log_sigma, self.log_sigma_proj, self.bandwidth, mask, self.eps)
