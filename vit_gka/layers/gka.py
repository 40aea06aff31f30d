"""Gaussian Kernel Attention (GKA) as a timm attention layer: the paper's operator, Eq. 2-7.

Paper: "Projection-Free Transformers via Gaussian Kernel Attention", Kundu, Ghosh, Ghosh, Honavar,
arXiv 2605.02144 (2026). Per head h, on the head's slice x of the (already LayerNorm'd) tokens:

    K_ij = exp(-||x_i - x_j||^2 / (2 sigma_h^2))          (Eq. 2-3, sigma_h = exp(log_sigma_h))
    W_ij = K_ij / (sum_j' K_ij' + eps)                     (Eq. 4)
    y_i  = sum_j W_ij x_j                                  (Eq. 5)

with ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b (Eq. 6) and masks multiplying K (Eq. 7); then heads are
concatenated and go through the single output projection W_O. No Q, K or V projection.

The functions here are the paper's materialised form (the oracle for tests, ``impl="reference"``);
``vit_gka.layers.gka_backends`` computes the same through PyTorch's fused attention kernels and
``vit_gka.layers.gka_triton`` through the project's own Triton kernels. ``GaussianKernelAttention.forward``
is the whole layer: every backend side by side, as timm's ``Attention.forward`` has its fused and plain paths.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from vit_gka.layers.gka_backends import auto_impl, check_impl, gka_flex, gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.gka_triton import gka_triton, triton_runs
from vit_gka.layers.projection_free import ProjectionFreeAttention

# torch.fx (torchvision's create_feature_extractor, which does not know timm's leaf modules) records calls to these as
# graph nodes instead of tracing into them: their dtype and shape arithmetic is not symbolically traceable.
for _backend in ('gka_flex', 'gka_reference', 'gka_sdpa_bias', 'gka_sdpa_pad', 'gka_triton'):
    torch.fx.wrap(_backend)

__all__ = ['GaussianKernelAttention', 'apply_mask', 'default_sigma', 'gaussian_kernel', 'gka_reference',
           'gka_weights', 'pairwise_sq_dist', 'row_normalise']


def pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j over the last two dims (Eq. 6)."""
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


def gka_weights(
        x: torch.Tensor, log_sigma: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = 1e-6,
) -> torch.Tensor:
    """The weights W (B, H, N, N) of Eq. 2-4 and 7 on heads x (B, H, N, d), in float32 at least (in float16
    the squared norms of Eq. 6 overflow)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return row_normalise(apply_mask(gaussian_kernel(pairwise_sq_dist(xf), log_sigma.to(xf.dtype)), mask), eps)


def gka_reference(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        eps: float = 1e-6,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """The paper's materialised GKA on heads x (B, H, N, d); returns (B, H, N, d) in x's dtype (Eq. 5)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    weights = F.dropout(gka_weights(xf, log_sigma, mask, eps), p=dropout_p, training=dropout_p > 0)
    return (weights @ xf).to(x.dtype)


def default_sigma(head_dim: int) -> float:
    """sigma^2 = sqrt(d): the initial logits x_i.x_j / sigma^2 then have dot-product attention's temperature."""
    return head_dim ** 0.25


class GaussianKernelAttention(ProjectionFreeAttention):
    """Projection-free Gaussian Kernel Attention, a drop-in ``attn_layer`` for timm's ViT ``Block``.

    Args:
        dim: token width D; heads have width d = D / num_heads.
        num_heads: number of heads H, each with one learnable bandwidth (``log_sigma``, shape (H,)).
        timm's other ``attn_layer`` keywords (``ProjectedHeads``): ``qkv_bias`` and ``qk_norm`` are ignored (GKA
            has no q, k or v projection); ``scale_norm``, ``proj_bias``, ``attn_drop`` (dropout on the weights W),
            ``proj_drop``, ``norm_layer``, ``device``, ``dtype`` as timm's ``Attention``.
        impl: ``"auto"`` (default: the fastest fused backend for the device and mask, see
            ``gka_backends.auto_impl``), ``"sdpa_pad"`` / ``"sdpa_bias"`` (the softmax identity through SDPA,
            bias folded into a padded extra dimension or added as a mask), ``"flex"`` (FlexAttention;
            windows as block-sparse BlockMasks; CUDA for training), ``"triton"`` (the project's own fused kernels,
            ``gka_triton``: CUDA, causal and window masks; elsewhere, or with an ``attn_mask``, ``sdpa_pad``) or
            ``"reference"`` (the paper's materialised Eq. 6). ``"fused"`` is accepted as a name for ``"auto"``.
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
            *,
            impl: str = 'auto',
            window: Optional[int] = None,
            window_2d: Optional[int] = None,
            sigma_init: Optional[float] = None,
            eps: float = 1e-6,
            **timm_args,
    ) -> None:
        impl = check_impl(impl, timm_args.get('attn_drop', 0.))
        super().__init__(dim, num_heads, window=window, window_2d=window_2d, sigma_init=sigma_init,
                         default_sigma=default_sigma, **timm_args)
        self.impl = impl
        self.eps = eps

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, impl={self.impl}, window={self.window}, window_2d={self.window_2d}'

    def backend(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> str:
        """This call's backend: ``impl``; for ``auto`` the fastest for the device, masks and grad mode
        (``gka_backends.auto_impl``); ``triton`` where its kernels run and the masks are structural, else the fused
        ``sdpa_pad``. A graph traced by torch.fx takes ``sdpa_pad``, which runs on every device."""
        if isinstance(x, torch.fx.Proxy):
            return 'sdpa_pad'
        if self.impl == 'auto':
            return auto_impl(x, self.masked(attn_mask, is_causal), self.windowed, dropout=self.dropout_p > 0)
        if self.impl == 'triton' and (attn_mask is not None or not triton_runs(x)):
            return 'sdpa_pad'
        return self.impl

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        impl = self.backend(x, attn_mask, is_causal)
        if impl == 'triton':  # reads the tokens in place as (B, N, H, d) and writes that layout: no permutes
            prefix, _, grid_w = self.grid(N) if self.window_2d is not None else (0, 1, 1)
            out = gka_triton(x.view(B, N, self.num_heads, self.head_dim), self.log_sigma, is_causal, self.window,
                             self.window_2d, prefix, grid_w)
            return self.project(out.reshape(B, N, C))
        heads = self.split_heads(x)
        if impl == 'flex':  # causal / windows as a block-sparse BlockMask, the caller's mask in the score_mod
            out = gka_flex(heads, self.log_sigma, self.block_mask(N, x.device, is_causal), attn_mask)
        else:
            mask = self.mask(N, x.device, attn_mask, is_causal)
            if impl == 'reference':
                out = gka_reference(heads, self.log_sigma, mask, self.eps, self.dropout_p)
            elif impl == 'sdpa_bias':
                out = gka_sdpa_bias(heads, self.log_sigma, mask, self.dropout_p)
            else:
                out = gka_sdpa_pad(heads, self.log_sigma, mask, self.dropout_p)
        return self.merge_heads(out)

    def head_weights(self, heads: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return gka_weights(heads, self.log_sigma, mask, self.eps)
