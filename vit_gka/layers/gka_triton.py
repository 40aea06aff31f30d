"""Fused GKA as torch operators with Triton kernels (``vit_gka.layers.gka_triton_kernels``): ``impl="triton"``.

``gka_triton(x, log_sigma, ...)`` takes the head view (B, N, H, d) of the LayerNorm'd tokens as it is (any
strides) and returns GKA's output in the same layout, (B, N, H, d), which reshapes to (B, N, H * d) for W_O with
no copy. Two operators do the work, ``vit_gka::gka_fwd`` (output and row log-sum-exp) and ``vit_gka::gka_bwd``
(dx and the bandwidth's gradient), registered with ``torch.library.custom_op``, a fake (meta) implementation and
an autograd formula: ``torch.compile`` keeps them whole in its graph (no graph break), CUDA graphs capture them,
fvcore counts them (``vit_gka.measure.flops``). ``triton_op`` would let Inductor see inside them, but it cannot
be compiled under Triton's CPU interpreter, which is how the kernels are tested without a GPU.

Where they run: on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package
was imported (the interpreter, slow: tests only). Elsewhere (a CPU run of a model built with
``impl="triton"``) the layer takes the fused SDPA path, ``sdpa_pad``: ``triton_runs`` decides.

Masks: causal, the paper's 1-D window and the 2-D patch-grid window are evaluated inside the kernels, and a
2-D window visits only the key blocks its rows can reach. Any other ``attn_mask`` stays on ``sdpa_pad``.
Attention dropout is not implemented in the kernels (``check_impl`` refuses ``attn_drop > 0``).
"""
import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

__all__ = ['gka_bwd', 'gka_fwd', 'gka_triton', 'triton_runs']


# The interpreter runs programs one after another through numpy: 32-token tiles keep ViT-length tests within
# seconds and still give several blocks per sequence.
INTERPRETER_TILES = {'BLOCK_M': 32, 'BLOCK_N': 32, 'BLOCK': 32}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the operators allocate (each element is then written by a kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET') == '1'


HAS_TRITON = importlib.util.find_spec('triton') is not None


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device: CUDA, or any device under the interpreter."""
    return (x.is_cuda or _interpreting()) and HAS_TRITON


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernels, autotuned over tile sizes on a GPU (the interpreter runs one small configuration)."""
    import triton

    from vit_gka.layers import gka_triton_kernels as k
    keys = ['N', 'HEAD_DIM', 'CAUSAL', 'WINDOW', 'GRID', 'DOT_F32']
    if _interpreting():
        tiles = INTERPRETER_TILES
        return (k.gka_fwd_kernel, k.gka_bwd_kernel, k.gka_delta_kernel,
                {'BLOCK_M': tiles['BLOCK_M'], 'BLOCK_N': tiles['BLOCK_N']}, {'BLOCK': tiles['BLOCK']})
    fwd_configs = [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=s)
                   for m, n, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2),
                                      (128, 128, 8, 2), (64, 128, 4, 2), (32, 64, 4, 3)]]
    bwd_configs = [triton.Config({'BLOCK': b}, num_warps=w, num_stages=s)
                   for b, w, s in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2), (64, 4, 3)]]
    fwd = triton.autotune(fwd_configs, key=keys)(k.gka_fwd_kernel)
    bwd = triton.autotune(bwd_configs, key=keys)(k.gka_bwd_kernel)
    return fwd, bwd, k.gka_delta_kernel, {}, {}


def _head_pad(head_dim: int) -> int:
    """The head width the kernels compute at: a power of two >= 16 (tl.dot's smallest tile)."""
    if head_dim > 128:
        raise ValueError(f'impl="triton" takes heads of width <= 128, got {head_dim}')
    return max(16, 1 << (head_dim - 1).bit_length())


def _flags(causal: bool, window: int, radius: int, x: torch.Tensor) -> dict:
    return dict(CAUSAL=causal, WINDOW=window > 0, GRID=radius >= 0,
                DOT_F32=_interpreting() or x.dtype == torch.float32)


def _check(x: torch.Tensor, inv_var: torch.Tensor) -> None:
    if x.dim() != 4 or inv_var.shape != (x.shape[2],):
        raise ValueError(f'gka_fwd takes x (B, N, H, d) and inv_var (H,), got {tuple(x.shape)} and '
                         f'{tuple(inv_var.shape)}')
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f'impl="triton" takes float32, float16 or bfloat16 tokens, got {x.dtype}')


@torch.library.custom_op('vit_gka::gka_fwd', mutates_args=())
def gka_fwd(x: torch.Tensor, inv_var: torch.Tensor, causal: bool, window: int, radius: int, prefix: int,
            grid_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """GKA on heads x (B, N, H, d) with s = ``inv_var`` = 1 / sigma^2 (H,): (output (B, N, H, d) in x's dtype,
    row log-sum-exp (B, H, N) in float32, base 2). ``window`` 0 = none; ``radius`` -1 = no 2-D window."""
    _check(x, inv_var)
    B, N, H, d = x.shape
    out = _empty((B, N, H, d), x.dtype, x.device)
    lse = _empty((B, H, N), torch.float32, x.device)
    if out.numel() == 0:
        return out, lse
    fwd, _, _, tiles, _ = _kernels()
    fwd[lambda meta: (-(-N // meta['BLOCK_M']), B * H)](
        x, out, lse, inv_var.float().contiguous(), N, H, *x.stride(), *out.stride(), window, radius, prefix, grid_w,
        HEAD_DIM=d, D_PAD=_head_pad(d), **_flags(causal, window, radius, x), **tiles)
    return out, lse


@gka_fwd.register_fake
def _gka_fwd_fake(x, inv_var, causal, window, radius, prefix, grid_w):
    B, N, H, d = x.shape
    return x.new_empty((B, N, H, d)), x.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op('vit_gka::gka_bwd', mutates_args=())
def gka_bwd(grad: torch.Tensor, x: torch.Tensor, inv_var: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            causal: bool, window: int, radius: int, prefix: int, grid_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, N, H, d) in x's dtype, d loss / d inv_var (H,) in float32) from ``gka_fwd``'s output and grad."""
    B, N, H, d = x.shape
    dx = _empty((B, N, H, d), x.dtype, x.device)
    if dx.numel() == 0:
        return dx, torch.zeros((H,), dtype=torch.float32, device=x.device)
    _, bwd, delta_kernel, _, tiles = _kernels()
    d_pad = _head_pad(d)
    delta = _empty((B, H, N), torch.float32, x.device)
    delta_kernel[(-(-N // 64), B * H)](out, grad, delta, N, H, *out.stride(), *grad.stride(),
                                       HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=64)
    # One partial of dL/ds per token (every tile configuration writes each of them: the sum is deterministic)
    ds_tokens = _empty((B, H, N), torch.float32, x.device)
    bwd[lambda meta: (-(-N // meta['BLOCK']), B * H)](
        x, grad, lse, delta, dx, ds_tokens, inv_var.float().contiguous(), N, H, *x.stride(), *grad.stride(),
        *dx.stride(), window, radius, prefix, grid_w, HEAD_DIM=d, D_PAD=d_pad, **_flags(causal, window, radius, x), **tiles)
    return dx, ds_tokens.sum(dim=(0, 2))


@gka_bwd.register_fake
def _gka_bwd_fake(grad, x, inv_var, out, lse, causal, window, radius, prefix, grid_w):
    return x.new_empty(x.shape), x.new_empty((x.shape[2],), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, inv_var, *masks = inputs
    out, lse = output
    ctx.save_for_backward(x, inv_var, out, lse)
    ctx.masks = masks


def _backward(ctx, grad_out, grad_lse):
    x, inv_var, out, lse = ctx.saved_tensors
    dx, ds = gka_bwd(grad_out, x, inv_var, out, lse, *ctx.masks)
    return dx, ds.to(inv_var.dtype), None, None, None, None, None


gka_fwd.register_autograd(_backward, setup_context=_setup_context)


def gka_triton(
        x: torch.Tensor,
        log_sigma: torch.Tensor,
        causal: bool = False,
        window: Optional[int] = None,
        window_2d: Optional[int] = None,
        num_prefix_tokens: int = 0,
        grid_w: int = 1,
) -> torch.Tensor:
    """GKA on heads x (B, N, H, d) -> (B, N, H, d) through the Triton operators; ``window_2d`` (a radius) needs the
    patch grid's width ``grid_w`` and the ``num_prefix_tokens`` before it (``masks.resolve_grid``)."""
    inv_var = torch.exp(-2.0 * log_sigma.float())  # s = 1 / sigma^2; its gradient reaches log_sigma through autograd
    radius = -1 if window_2d is None else int(window_2d)
    out, _ = gka_fwd(x, inv_var, bool(causal), int(window or 0), radius, int(num_prefix_tokens), int(grid_w))
    return out
