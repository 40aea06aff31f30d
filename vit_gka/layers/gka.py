"""Gaussian Kernel Attention (GKA) as a timm attention layer.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu, Ghosh, Ghosh, Honavar,
arXiv 2605.02144 (2026). Per head h, on the head's slice x of the (already LayerNorm'd) tokens:

    K_ij = exp(-||x_i - x_j||^2 / (2 sigma_h^2))          (Eq. 2-3, sigma_h = exp(log_sigma_h))
    W_ij = K_ij / (sum_j' K_ij' + eps)                     (Eq. 4)
    y_i  = sum_j W_ij x_j                                  (Eq. 5)

then heads are concatenated and go through the single output projection W_O. No Q, K or V projection.

The implementations compute the same thing:

* ``impl="reference"`` is the paper's own materialised form (Eq. 6: ||a||^2 + ||b||^2 - 2 a.b, exp,
  normalise; Eq. 7 for masks). It builds the N x N kernel and is the oracle for tests.
* the fused ones (``"sdpa_pad"``, ``"sdpa_bias"``; ``"auto"``, the default, picks per call) use the
  identity ||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j. The ||x_i||^2 term is constant along
  row i and cancels in the normalisation, so

      W_ij = softmax_j( x_i.x_j / sigma^2 - ||x_j||^2 / (2 sigma^2) ),

  scaled-dot-product attention with q = x / sigma^2, k = v = x, scale 1 and a per-key bias. PyTorch's
  fused SDPA kernels (flash / memory-efficient) then do the work without an N x N tensor.
"""
import math
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_gka.layers.masks import build_mask, empty_rows, open_empty_rows, structural_mask_mod

GKA_IMPLS = ('auto', 'sdpa_pad', 'sdpa_bias', 'flex', 'reference')


def pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j over the last two dims (paper Eq. 6)."""
    sq = x.pow(2).sum(-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * x @ x.transpose(-2, -1)).clamp_min(0.0)


def gaussian_kernel(sq_dist: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """K_ij = exp(-d_ij / (2 sigma_h^2)), sigma_h = exp(log_sigma_h), one bandwidth per head (Eq. 2-3)."""
    inv_two_var = 0.5 * torch.exp(-2.0 * log_sigma).view(1, -1, 1, 1)
    return torch.exp(-sq_dist * inv_two_var)


def apply_mask(kernel: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply the kernel by the 0/1 mask, or by exp(additive mask) (Eq. 7)."""
    if mask is None:
        return kernel
    if mask.dtype == torch.bool:
        return kernel * mask
    return kernel * torch.exp(mask.to(kernel.dtype))


def row_normalise(kernel: torch.Tensor, eps: float) -> torch.Tensor:
    """W_ij = K_ij / (sum_j' K_ij' + eps) (Eq. 4). A row with every entry masked out becomes zeros."""
    return kernel / (kernel.sum(-1, keepdim=True) + eps)


def gka_reference(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        eps: float = 1e-6,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """The paper's materialised GKA on heads x of shape (B, H, N, d); returns (B, H, N, d).

    Computed in float32 at least, whatever the input dtype (in float16 the squared norms of Eq. 6 overflow).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    kernel = apply_mask(gaussian_kernel(pairwise_sq_dist(xf), log_sigma.to(xf.dtype)), mask)
    weights = F.dropout(row_normalise(kernel, eps), p=dropout_p, training=dropout_p > 0)
    return (weights @ xf).to(x.dtype)  # Eq. 5


def key_norm_bias(
        x: torch.Tensor, log_sigma: torch.Tensor, dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1 / sigma^2 as (1, H, 1, 1) in float32 at least, b_j = -||x_j||^2 / (2 sigma^2) as (B, H, N) in dtype).

    b is the key-norm term of the softmax identity, accumulated in float32 (``vector_norm(dtype=...)``
    reads x once and builds no x**2 temporary). For a 16-bit dtype (default: x's) it is shifted by its
    maximum over keys (the softmax is invariant to a per-row constant) and clamped, so per-head norms of
    1e3 stay finite; in float32 the fused kernels' own running max already does that, and the two extra
    passes are skipped.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    dtype = x.dtype if dtype is None else dtype
    inv_var = torch.exp(-2.0 * log_sigma.to(acc)).view(1, -1, 1, 1)
    bias = torch.linalg.vector_norm(x, dim=-1, dtype=acc).square() * (-0.5 * inv_var.squeeze(-1))
    if torch.finfo(dtype).bits < 32:
        bias = bias - bias.amax(dim=-1, keepdim=True).detach()
        bias = bias.clamp_min(torch.finfo(dtype).min / 2)
    return inv_var, bias.to(dtype)


def scaled_queries(x: torch.Tensor, inv_var: torch.Tensor) -> torch.Tensor:
    """q = x / sigma^2 per head, multiplied in float32 at least and returned in x's dtype."""
    return (x.to(inv_var.dtype) * inv_var).to(x.dtype)


def gka_sdpa_pad(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """GKA through ``F.scaled_dot_product_attention`` (the softmax identity); heads x (B, H, N, d).

    The key-norm bias is folded into one extra dimension, q' = [x / sigma^2, 1], k' = v' = [x, b],
    padded with zeros to a multiple of 8 (v' is k' itself: the output's extra columns are dropped). Measured on the CPU
    (benchmarks/attention.py) this stays on the flash kernel with or without a mask, where an additive
    (B, H, N, N) bias would have to be materialised as soon as a mask is combined with it; on CUDA the
    same inputs are eligible for FlashAttention and the memory-efficient kernel.

    The bias b_j = -||x_j||^2 / (2 sigma^2) comes from ``key_norm_bias`` (float32 accumulation; shifted
    and clamped for 16-bit dtypes, so per-head norms of 1e3 stay finite). Rows whose keys are all masked
    are returned as zeros.
    """
    head_dim = x.shape[-1]
    inv_var, bias = key_norm_bias(x, log_sigma)
    bias = bias.unsqueeze(-1)

    width = 8 * math.ceil((head_dim + 1) / 8)
    zeros = x.new_zeros(*x.shape[:-1], width - head_dim - 1)
    q = torch.cat([scaled_queries(x, inv_var), torch.ones_like(bias), zeros], dim=-1)
    k = torch.cat([x, bias, zeros], dim=-1)

    empty = empty_rows(mask)
    if empty is not None:
        mask = open_empty_rows(mask, empty)
    out = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    out = out[..., :head_dim]
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
        attn_bias = bias + (mask.to(x.dtype) if mask.dtype != torch.bool else
                            torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(~mask, float('-inf')))
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

    The key-norm bias goes in a ``score_mod``; causal and window masks come as a ``BlockMask`` (built by
    ``structural_mask_mod``), so blocks that are masked out entirely are skipped, not computed. A dense
    ``attn_mask`` (boolean or additive) is applied in the ``score_mod``. Rows whose keys are all masked
    return zeros. ``compiled`` (default: on CUDA only) wraps flex in torch.compile, without which flex
    runs an unfused eager path that materialises the scores; CPU flex has no backward in torch 2.14,
    so on the CPU it is a forward-only correctness path.
    """
    from torch.nn.attention.flex_attention import flex_attention
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_var, bias = key_norm_bias(x, log_sigma, acc)  # bias (B, H, N)
    if attn_mask is not None:
        extra = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, dtype=acc, device=x.device).masked_fill(~attn_mask, float('-inf'))
        extra = extra.expand(x.shape[0], x.shape[1], x.shape[2], x.shape[2])

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


GKA_FUNCTIONS = {'sdpa_pad': gka_sdpa_pad, 'sdpa_bias': gka_sdpa_bias}


def auto_impl(x: torch.Tensor, masked: bool, windowed: bool = False, dropout: bool = False) -> str:
    """The fastest correct fused backend for this call, by measurement (benchmarks/attention.py).

    CPU (torch 2.14, 2 cores, GKA-S heads): the additive bias beats the padded form by 1.2-1.7x at
    N = 197-4097 when nothing is masked; with a mask the bias would be materialised, so pad. Flex is
    never chosen on the CPU (no backward there, and it needs a compile per shape).
    CUDA: FlexAttention with a BlockMask for windows (it skips masked blocks); otherwise the padded form,
    which FlashAttention accepts (it takes no additive bias).
    """
    if x.device.type == 'cpu':
        return 'sdpa_pad' if masked else 'sdpa_bias'
    if windowed and not dropout:
        return 'flex'
    return 'sdpa_pad'


def default_sigma(head_dim: int) -> float:
    """sigma^2 = sqrt(d): the initial logits x_i.x_j / sigma^2 then have dot-product attention's temperature."""
    return head_dim ** 0.25


class ProjectedHeads(nn.Module):
    """What every attention layer here shares with timm's ``Attention``: the split into heads, attention
    dropout, the optional scale norm and the output projection W_O (with ``proj_drop``)."""

    def __init__(self, dim: int, num_heads: int, scale_norm: bool, proj_bias: bool, attn_drop: float,
                 proj_drop: float, norm_layer: Optional[Type[nn.Module]], dd: dict) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm and norm_layer is not None else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H * d) -> (B, H, N, d), a view."""
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> concatenated heads -> scale norm -> W_O -> proj_drop, (B, N, H * d)."""
        B, H, N, d = out.shape
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, H * d))))


class GaussianKernelAttention(ProjectedHeads):
    """Projection-free Gaussian Kernel Attention, a drop-in ``attn_layer`` for timm's ViT ``Block``.

    Args:
        dim: token width D; heads have width d = D / num_heads.
        num_heads: number of heads H, each with one learnable bandwidth (``log_sigma``, shape (H,)).
        qkv_bias, qk_norm: accepted for timm's interface and ignored: GKA has no q, k or v projection.
        scale_norm: LayerNorm on the concatenated heads before ``proj`` (as timm's ``Attention``).
        proj_bias: bias of the output projection W_O.
        attn_drop: dropout on the attention weights W. proj_drop: dropout after W_O.
        impl: ``"auto"`` (default: the fastest fused backend for the device and mask, see ``auto_impl``),
            ``"sdpa_pad"`` / ``"sdpa_bias"`` (the softmax identity through SDPA, bias folded into a padded
            extra dimension or added as a mask), ``"flex"`` (FlexAttention; windows as block-sparse
            BlockMasks; CUDA for training) or ``"reference"`` (the paper's materialised Eq. 6).
            ``"fused"`` is accepted as a name for ``"auto"``.
        window: the paper's 1-D sliding window W over token index (Eq. 7): i - W < j <= i when causal,
            else |i - j| < W.
        window_2d: radius r of a 2-D neighbourhood on the patch grid: patch tokens see patches within
            Chebyshev distance r; prefix tokens (class token) see and are seen by all.
        sigma_init: initial bandwidth sigma (> 0). Default None = d ** 0.25, i.e. sigma^2 = sqrt(d), so the
            initial logits x_i.x_j / sigma^2 have the 1 / sqrt(d) temperature of dot-product attention
            (sigma = 1 would make early attention on LayerNorm'd tokens nearly the identity).
        eps: the epsilon of the row normalisation (Eq. 4), used by the reference implementation; with
            the diagonal always present (K_ii = 1) it changes nothing measurable in the fused one.

    ``forward(x, attn_mask=None, is_causal=False)`` as timm's ``Attention``. ``attn_mask`` is boolean
    (True = attend) or additive, shaped (N, N), (B, N, N) or (B, 1|H, N, N). A query row whose keys
    are all masked out returns zeros.
    """

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
            impl: str = 'auto',
            window: Optional[int] = None,
            window_2d: Optional[int] = None,
            sigma_init: Optional[float] = None,
            eps: float = 1e-6,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer, dd)
        impl = 'auto' if impl == 'fused' else impl
        if impl not in GKA_IMPLS:
            raise ValueError(f'impl={impl!r} is not one of {GKA_IMPLS}')
        if window is not None and window <= 0:
            raise ValueError(f'window must be a positive number of tokens, got {window}')
        if window_2d is not None and window_2d < 0:
            raise ValueError(f'window_2d must be a radius >= 0 in patches, got {window_2d}')
        if impl == 'flex' and attn_drop > 0:
            raise ValueError('impl="flex" has no attention dropout; use attn_drop=0 or another impl')
        if sigma_init is not None and not sigma_init > 0:
            raise ValueError(f'sigma_init must be > 0, got {sigma_init}')
        self.impl = impl
        self.window = window
        self.window_2d = window_2d
        self.eps = eps
        self.sigma_init = default_sigma(self.head_dim) if sigma_init is None else float(sigma_init)
        # Set by the model (models.py) so that window_2d knows the patch grid; inferred when unset.
        self.grid_size: Optional[Tuple[int, int]] = None
        self.num_prefix_tokens: Optional[int] = None
        self._block_masks = {}

        self.log_sigma = nn.Parameter(torch.full((num_heads,), math.log(self.sigma_init), **dd))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, impl={self.impl}, window={self.window}, window_2d={self.window_2d}'

    def resolve_impl(self, x: torch.Tensor, masked: bool) -> str:
        if self.impl != 'auto':
            return self.impl
        windowed = self.window is not None or self.window_2d is not None
        return auto_impl(x, masked, windowed, dropout=self.training and self.attn_drop.p > 0)

    def attend(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention core on heads x (B, H, N, d) with a dense SDPA-style mask (or None)."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        impl = self.resolve_impl(x, mask is not None)
        if impl == 'reference':
            return gka_reference(x, self.log_sigma, mask, self.eps, dropout_p)
        if impl == 'flex':
            return gka_flex(x, self.log_sigma, attn_mask=mask)
        return GKA_FUNCTIONS[impl](x, self.log_sigma, mask, dropout_p)

    def block_mask(self, n: int, device: torch.device, is_causal: bool):
        """FlexAttention BlockMask of the causal / window masks, built once per (N, device, causal)."""
        key = (n, str(device), is_causal)
        if key not in self._block_masks:
            mask_mod = structural_mask_mod(
                n, is_causal, self.window, self.window_2d, self.grid_size, self.num_prefix_tokens)
            if mask_mod is None:
                self._block_masks[key] = None
            else:
                from torch.nn.attention.flex_attention import create_block_mask
                self._block_masks[key] = create_block_mask(mask_mod, None, None, n, n, device=device)
        return self._block_masks[key]

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        N = x.shape[1]
        heads = self.split_heads(x)
        masked = attn_mask is not None or is_causal or self.window is not None or self.window_2d is not None
        if self.resolve_impl(heads, masked) == 'flex':
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(1)
            out = gka_flex(heads, self.log_sigma, self.block_mask(N, x.device, is_causal), attn_mask)
        else:
            mask = build_mask(
                N, x.device, attn_mask, is_causal, self.window, self.window_2d, self.grid_size,
                self.num_prefix_tokens)
            out = self.attend(heads, mask)
        return self.merge_heads(out)
