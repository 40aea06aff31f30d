"""Compact-kernel attention: projection-free Epanechnikov, biweight and triweight attention.

Paper: "Sparse Attention as Compact Kernel Regression", Santos, Goncalves, McNamee, Treviso, Martins,
arXiv 2601.22766 (2026); reference code github.com/deep-spin/sparse_att. It builds on GKA
(arXiv 2605.02144, ``vit_gka.layers.gka``): the same projection-free layer (``ProjectionFreeAttention``: the
head slices x of the LayerNorm'd tokens are queries, keys and values; one bandwidth per head; one output
projection W_O), with the Gaussian kernel replaced by a compact one. Per head, with h = exp(log_sigma_h):

    u_ij^2 = ||x_i - x_j||^2 / h^2
    K_ij   = (1 - u_ij^2)_+^n          n = 1 Epanechnikov, 2 biweight, 3 triweight
                                       (1 - u^2 / n)_+^n -> exp(-u^2): the Gaussian is the limit n -> inf

and two ways to normalise each row of K into weights W (output y_i = sum_j W_ij x_j):

* ``fixed``: W_ij = K_ij / sum_j' K_ij' (Nadaraya-Watson). Epanechnikov gives normalised-ReLU attention.
  The diagonal has u = 0, K = 1, so every row that may attend to itself is nonempty.
* ``adaptive``: a per-row threshold chosen so that the weights sum to one, which is alpha-entmax with
  alpha = 1 + 1/n on the scores z_ij = n (2 x_i.x_j - ||x_j||^2) / h^2: sparsemax (n = 1), entmax-1.5
  (n = 2), entmax with alpha = 4/3 (n = 3), through PyPI ``entmax``. entmax is shift-invariant, so the
  scores are computed as z_ij = -n ||x_i - x_j||^2 / h^2 (the same up to the row constant n ||x_i||^2 / h^2)
  and on the support W_ij = (C_i - ||x_i - x_j||^2 / h^2)^n exactly, C_i set by the threshold. The
  diagonal is each row's largest score (distance 0, set exactly), and entmax always keeps the largest
  score in its support, so an unmasked diagonal is never zero.

Both are dense: the N x N weights are materialised (entmax has no fused kernel), in float32 at least and
with autocast off, so bfloat16 / float16 inputs and mixed precision give float32-accurate weights.

Masks follow ``vit_gka.layers.masks`` (SDPA convention). Fixed: K is multiplied by the 0/1 mask or by
exp(additive mask) (GKA's Eq. 7). Adaptive: additive masks are added to the scores and masked scores
are -inf; a fully masked row gives zeros. PyPI ``entmax`` 1.3, checked on the CPU: -inf entries get
exact zeros and zero gradients when the row has one finite score, but a row of -inf only crashes
``sparsemax`` / ``entmax15`` (index -1 out of bounds; a device-side assert on CUDA) and makes
``entmax_bisect`` return NaN, and ``entmax15`` computes inf - inf = NaN internally for the -inf entries.
So masked scores are replaced by a finite value that is provably outside the support (see
``mask_scores``) and fully masked rows are zeroed after the fact. The other known issue, NaN for
alpha well above 2, does not arise: alpha = 1 + 1/n <= 2. entmax in bfloat16 is not accurate (rows
summing to 0.98), another reason for float32.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from entmax import entmax15, entmax_bisect, sparsemax

from vit_gka.layers.gka import apply_mask, pairwise_sq_dist
from vit_gka.layers.projection_free import ProjectionFreeAttention, no_autocast

__all__ = [
    'KERNELS', 'KERNEL_DEGREE', 'NORMALIZATIONS', 'KernelAttention', 'compact_kernel', 'compact_kernel_attention',
    'compact_weights', 'default_bandwidth',
]

KERNEL_DEGREE = {'epanechnikov': 1, 'biweight': 2, 'triweight': 3}
KERNELS = tuple(KERNEL_DEGREE)
NORMALIZATIONS = ('fixed', 'adaptive')
# Bisection steps of entmax_bisect (triweight, alpha 4/3). The bracket is narrower than 1 and each step
# halves it: 30 steps reach float32 resolution (measured: the same weights and support as the exact
# sort-based entmax15 to 3e-7); float64 (gradcheck) needs the package default of 50.
BISECT_ITERS = {torch.float64: 50}
BISECT_ITERS_DEFAULT = 30


def compact_kernel(u2: torch.Tensor, n: int) -> torch.Tensor:
    """K = (1 - u^2)_+^n: Epanechnikov (n = 1), biweight (2), triweight (3) (paper Sec. 3, compact kernels)."""
    return (1.0 - u2).clamp_min(0.0).pow(n)


def fixed_normalise(kernel: torch.Tensor) -> torch.Tensor:
    """W_ij = K_ij / sum_j' K_ij' (Nadaraya-Watson, fixed normalisation). An all-zero row stays zero."""
    total = kernel.sum(-1, keepdim=True)
    return kernel / torch.where(total > 0, total, torch.ones_like(total))


def adaptive_scores(sq_dist: torch.Tensor, inv_h2: torch.Tensor, n: int) -> torch.Tensor:
    """z_ij = -n ||x_i - x_j||^2 / h^2 = n (2 x_i.x_j - ||x_j||^2) / h^2 - n ||x_i||^2 / h^2 (adaptive
    normalisation's entmax scores; the row constant drops out of entmax)."""
    return -n * sq_dist * inv_h2


def alpha_entmax(z: torch.Tensor, n: int) -> torch.Tensor:
    """alpha-entmax over the last dim with alpha = 1 + 1/n: W_ij = (z_ij / n - tau_i)_+^n, sum_j W_ij = 1."""
    if n == 1:
        return sparsemax(z, dim=-1)
    if n == 2:
        return entmax15(z, dim=-1)
    n_iter = BISECT_ITERS.get(z.dtype, BISECT_ITERS_DEFAULT)
    return entmax_bisect(z, alpha=1.0 + 1.0 / n, dim=-1, n_iter=n_iter)


def mask_scores(
        z: torch.Tensor, mask: Optional[torch.Tensor], n: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Apply an SDPA-style mask to entmax scores; returns (scores, fully-masked rows or None).

    Semantically masked scores are -inf. They are written as fill_i = m_i - (n + 1) - |m_i| instead, m_i
    the row's largest unmasked score: entmax's threshold satisfies tau_i >= m_i / n - 1 (no weight
    exceeds 1), so fill_i / n - tau_i <= -1/n - |m_i| / n < 0 and the weight is exactly 0, with zero
    gradient, without -inf inside ``entmax`` (see the module docstring). Rows with no unmasked key get
    scores 0 and are zeroed by the caller.
    """
    if mask is None:
        return z, None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        z = z + mask.to(z.dtype)
        allowed = z > float('-inf')
    allowed = allowed.expand_as(z)
    top = z.detach().masked_fill(~allowed, float('-inf')).amax(-1, keepdim=True)
    empty = top == float('-inf')
    top = top.masked_fill(empty, 0.0)
    fill = top - (n + 1) - top.abs()
    return torch.where(allowed, z, fill), empty


def _exact_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 through the norm identity (GKA Eq. 6), clamped at 0, with an exact 0 diagonal."""
    n = x.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return pairwise_sq_dist(x).masked_fill(eye, 0.0)


def compact_weights(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        n: int,
        normalization: str,
        mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention weights W (B, H, N, N) of a compact kernel of degree ``n`` on heads x (B, H, N, d).

    In float32 at least (float64 stays float64), autocast off. Fully masked rows are zeros; so are
    ``fixed`` rows whose diagonal is masked and whose allowed keys all lie outside the bandwidth (K = 0).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    with no_autocast(x.device):
        xf = x.to(acc)
        sq_dist = _exact_sq_dist(xf)
        inv_h2 = torch.exp(-2.0 * log_sigma.to(acc)).view(1, -1, 1, 1)
        if normalization == 'fixed':
            return fixed_normalise(apply_mask(compact_kernel(sq_dist * inv_h2, n), mask))
        z, empty = mask_scores(adaptive_scores(sq_dist, inv_h2, n), mask, n)
        weights = alpha_entmax(z, n)
        return weights if empty is None else weights.masked_fill(empty, 0.0)


def compact_kernel_attention(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        n: int,
        normalization: str,
        mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """y_i = sum_j W_ij x_j with compact-kernel weights; heads x (B, H, N, d) -> (B, H, N, d), x's dtype."""
    weights = compact_weights(x, log_sigma, n, normalization, mask)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    with no_autocast(x.device):
        return (weights @ x.to(weights.dtype)).to(x.dtype)


def default_bandwidth(head_dim: int) -> float:
    """h = sqrt(2 d): h^2 is the mean squared distance ||x_i - x_j||^2 = 2 d between two unrelated
    LayerNorm'd head slices (||x||^2 ~ d each), so at initialisation a typical pair lies on the kernel's
    support boundary and about half of the keys are inside it.

    A GKA-matched bandwidth (h^2 = 2 n sigma_GKA^2 = 2 n sqrt(d), the same logits as GKA at init) was
    measured dead on Fashion-MNIST (gka_fmnist shape, d = 32, first batch): each row's support held only
    tokens identical to the query (blank background patches, distance 0), so K = 1 whatever h, and the
    gradient of every log_sigma was exactly 0 for Epanechnikov (1e-7 to 1e-4 for the others). With
    h = sqrt(2 d) the rows keep 16-32 of 50 keys and log_sigma gradients are 1e-2.
    """
    return math.sqrt(2 * head_dim)


class KernelAttention(ProjectionFreeAttention):
    """Projection-free compact-kernel attention, a timm ``attn_layer``.

    Args: those of ``GaussianKernelAttention`` but ``impl`` and ``eps`` (timm's, ``window``, ``window_2d``,
    ``sigma_init``; all but ``dim`` and ``num_heads`` as keywords), and

        kernel: ``"epanechnikov"`` (default), ``"biweight"`` or ``"triweight"`` ((1 - u^2)_+^n, n = 1, 2, 3). The
            Gaussian is GKA itself: ``vit_gka.GaussianKernelAttention`` (``attn_layer='gka'``), the one way to build it.
        normalization: ``"fixed"`` (K / row sum; normalised ReLU for Epanechnikov) or ``"adaptive"``
            (alpha-entmax, alpha = 1 + 1/n: sparsemax, entmax-1.5, alpha 4/3).

    ``log_sigma`` is log h, the bandwidth in u = ||x_i - x_j|| / h, initialised to ``sigma_init`` or
    ``default_bandwidth(d)`` = sqrt(2 d) (see there why not GKA's sigma). There is one materialised implementation
    (entmax has no fused kernel) and no epsilon (rows are nonempty or zeroed). ``degree`` is n. Masks, windows and
    fully masked rows as for GKA.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            kernel: str = 'epanechnikov',
            normalization: str = 'fixed',
            window: Optional[int] = None,
            window_2d: Optional[int] = None,
            sigma_init: Optional[float] = None,
            **timm_args,
    ) -> None:
        if kernel == 'gaussian':
            raise ValueError("kernel='gaussian' is GKA: build vit_gka.GaussianKernelAttention (attn_layer='gka')")
        if kernel not in KERNELS:
            raise ValueError(f'kernel={kernel!r} is not one of {KERNELS}')
        if normalization not in NORMALIZATIONS:
            raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}')
        super().__init__(dim, num_heads, window=window, window_2d=window_2d, sigma_init=sigma_init,
                         default_sigma=default_bandwidth, **timm_args)
        self.kernel = kernel
        self.normalization = normalization
        self.degree = KERNEL_DEGREE[kernel]

    def extra_repr(self) -> str:
        return (f'kernel={self.kernel}, normalization={self.normalization}, heads={self.num_heads}, '
                f'window={self.window}, window_2d={self.window_2d}')

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        mask = self.mask(x.shape[1], x.device, attn_mask, is_causal)
        out = compact_kernel_attention(self.split_heads(x), self.log_sigma, self.degree, self.normalization, mask,
                                       self.dropout_p)
        return self.merge_heads(out)

    def head_weights(self, heads: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return compact_weights(heads, self.log_sigma, self.degree, self.normalization, mask)
