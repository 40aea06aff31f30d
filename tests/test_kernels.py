"""Compact-kernel attention (arXiv 2601.22766) against references written here from the kernel formulas.

The references loop over heads and rows and use explicit differences x_i - x_j; the adaptive one
calls PyPI ``entmax`` on each row's unmasked scores only, in the paper's form
z_j = n (2 x_i.x_j - ||x_j||^2) / h^2, so neither shares code or tricks with ``vit_gka.layers.compact``.
"""
import math

import pytest
import timm
import torch
from entmax import entmax15, entmax_bisect, sparsemax

import vit_gka
from vit_gka import GaussianKernelAttention, KernelAttention
from vit_gka.layers import ProjectionFreeAttention
from vit_gka.layers.gka import gka_reference
from vit_gka.models.compact_deit import COMPACT_MODELS
from vit_gka.measure.attention import AttentionSparsity, attention_sparsity, attention_weights, model_sparsity
from vit_gka.layers.compact import compact_kernel, compact_kernel_attention, compact_weights
from vit_gka.layers.masks import build_mask

from helpers import masks

DEGREE = {'epanechnikov': 1, 'biweight': 2, 'triweight': 3}
COMBOS = [(k, norm) for k in DEGREE for norm in ('fixed', 'adaptive')]
N = 26  # 1 class token + a 5 x 5 patch grid
F64 = torch.float64


def mask_cases(n=N, batch=2):
    return masks(n, batch, p_masked=0.4, window=4, dtype=F64)


def entmax_alpha(z, n):
    """alpha-entmax with alpha = 1 + 1/n from the entmax package (exact sort-based where it has one)."""
    if n == 1:
        return sparsemax(z, dim=-1)
    if n == 2:
        return entmax15(z, dim=-1)
    return entmax_bisect(z, alpha=1 + 1 / n, dim=-1, n_iter=100)


def reference_weights(x, h, n, normalization, mask=None):
    """W (B, H, N, N) from the formulas: u = ||x_i - x_j|| / h, K = (1 - u^2)_+^n; fixed: K * allowed *
    exp(additive) / row sum (zeros if that sum is 0); adaptive: entmax_{1+1/n} of
    z_j = n (2 x_i.x_j - ||x_j||^2) / h^2 + additive over the row's allowed keys. Fully masked rows: zeros."""
    B, H, T, _ = x.shape
    if mask is None:
        allowed, extra = torch.ones(T, T, dtype=torch.bool), torch.zeros(T, T, dtype=x.dtype)
    elif mask.dtype == torch.bool:
        allowed, extra = mask, torch.zeros((), dtype=x.dtype)
    else:
        allowed = mask > float('-inf')
        extra = torch.where(allowed, mask, torch.zeros((), dtype=mask.dtype)).to(x.dtype)
    allowed = allowed.expand(B, H, T, T)
    extra = extra.expand(B, H, T, T)
    w = torch.zeros(B, H, T, T, dtype=x.dtype)
    for b in range(B):
        for hd in range(H):
            xs = x[b, hd]
            u2 = (xs[:, None, :] - xs[None, :, :]).pow(2).sum(-1) / h[hd] ** 2
            scores = n * (2 * xs @ xs.T - xs.pow(2).sum(-1)[None, :]) / h[hd] ** 2 + extra[b, hd]
            kernel = torch.clamp(1 - u2, min=0) ** n * torch.exp(extra[b, hd])
            for i in range(T):
                keep = allowed[b, hd, i]
                if not keep.any():
                    continue
                if normalization == 'fixed':
                    row = kernel[i] * keep
                    if row.sum() > 0:  # else no allowed key within the bandwidth: zeros, as masked rows
                        w[b, hd, i] = row / row.sum()
                else:
                    w[b, hd, i, keep] = entmax_alpha(scores[i, keep], n)
    return w


def heads_input(batch=2, heads=3, n=N, d=4, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, d, dtype=F64, generator=g) * scale


@pytest.mark.parametrize('mask_name', list(mask_cases()))
@pytest.mark.parametrize('kernel, normalization', COMBOS)
def test_weights_match_formula_reference(kernel, normalization, mask_name):
    n = DEGREE[kernel]
    x = heads_input()
    log_sigma = torch.tensor([0.3, 0.8, 1.2], dtype=F64)  # bandwidths h ~ 1.3-3.3: partly sparse rows
    kwargs = mask_cases()[mask_name]
    mask = build_mask(N, **kwargs)
    got = compact_weights(x, log_sigma, n, normalization, mask)
    expect = reference_weights(x, log_sigma.exp(), n, normalization, mask)
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got).all()
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > float('-inf')
        allowed = allowed.expand_as(got)
        assert (got[~allowed] == 0).all()
        empty = ~allowed.any(-1)
        assert (got.sum(-1)[empty] == 0).all()  # fully masked rows: zeros, not NaN
        if normalization == 'adaptive':  # fixed: also zero when no allowed key is within the bandwidth
            torch.testing.assert_close(got.sum(-1)[~empty], torch.ones_like(got.sum(-1)[~empty]))


@pytest.mark.parametrize('kernel', list(DEGREE))
def test_fixed_is_kernel_over_row_sum_and_epanechnikov_is_normalised_relu(kernel):
    n = DEGREE[kernel]
    x = heads_input(seed=1)
    h = torch.tensor([1.5, 2.0, 3.0], dtype=F64)
    w = compact_weights(x, h.log(), n, 'fixed')
    d2 = torch.cdist(x, x).pow(2)
    k = torch.clamp(1 - d2 / h.view(1, -1, 1, 1) ** 2, min=0) ** n
    torch.testing.assert_close(w, k / k.sum(-1, keepdim=True))
    if n == 1:  # normalised ReLU of the scores 2 x_i.x_j - ||x_j||^2 + (h^2 - ||x_i||^2)
        sq = x.pow(2).sum(-1)
        hh = h.view(1, -1, 1, 1) ** 2
        relu = torch.relu(2 * x @ x.transpose(-1, -2) - sq.unsqueeze(-2) + hh - sq.unsqueeze(-1))
        torch.testing.assert_close(w, relu / relu.sum(-1, keepdim=True))


@pytest.mark.parametrize('kernel', list(DEGREE))
def test_adaptive_has_compact_kernel_form_on_its_support(kernel):
    # entmax_{1+1/n} of z = n (2 x_i.x_j - ||x_j||^2) / h^2 is (C_i - ||x_i - x_j||^2 / h^2)_+^n: a compact
    # kernel of the row's own (adaptive) bandwidth; W^(1/n) + d_ij / h^2 is one constant C_i per row on
    # the support, and d_ij / h^2 >= C_i off it.
    n = DEGREE[kernel]
    x = heads_input(seed=2)
    h = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    w = compact_weights(x, h.log(), n, 'adaptive')
    u2 = torch.cdist(x, x).pow(2) / h.view(1, -1, 1, 1) ** 2
    support = w > 0
    c = torch.where(support, w.pow(1 / n) + u2, torch.nan)
    c_row = c.nanmean(-1, keepdim=True)
    torch.testing.assert_close(torch.where(support, c, c_row), c_row.expand_as(c), rtol=1e-9, atol=1e-9)
    assert (u2[~support] >= c_row.expand_as(c)[~support] - 1e-9).all()
    assert 0 < support.float().mean() < 1  # the test is not vacuous: sparse rows with several entries
    assert (support.sum(-1) > 1).any()


@pytest.mark.parametrize('normalization', ['fixed', 'adaptive'])
def test_gaussian_is_the_limit(normalization):
    # (1 - u^2/n)_+^n -> exp(-u^2): with h^2 = 2 n sigma^2 the degree-n kernel attention approaches GKA.
    u2 = torch.linspace(0, 9, 1000, dtype=F64)
    errors = [(compact_kernel(u2 / n, n) - torch.exp(-u2)).abs().max().item() for n in (1, 3, 10, 100, 1000)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-3
    x = heads_input(seed=4)
    sigma = torch.tensor([0.8, 1.5, 3.0], dtype=F64)
    gka = gka_reference(x, sigma.log(), eps=0.0)
    degrees = (1, 2, 3, 10, 40) if normalization == 'adaptive' else (1, 2, 3, 10, 100, 1000)
    errors = []
    for n in degrees:
        out = compact_kernel_attention(x, (sigma * math.sqrt(2 * n)).log(), n, normalization)
        errors.append((out - gka).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2 * errors[0]


@pytest.mark.parametrize('kernel, normalization', COMBOS)
def test_gradcheck_float64(kernel, normalization):
    n = DEGREE[kernel]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 7, 3, dtype=F64, generator=g).requires_grad_()
    log_sigma = torch.tensor([0.4, 0.9], dtype=F64, requires_grad=True)
    mask = build_mask(7, window=3)
    torch.autograd.gradcheck(
        lambda a, b: compact_kernel_attention(a, b, n, normalization, mask), (x, log_sigma), atol=1e-6)


def make_layer(kernel, normalization, dtype=F64, **kwargs):
    torch.manual_seed(0)
    return KernelAttention(12, num_heads=3, kernel=kernel, normalization=normalization, **kwargs).to(dtype)


@pytest.mark.parametrize('mask_name', list(mask_cases()))
@pytest.mark.parametrize('kernel, normalization', COMBOS)
def test_layer_forward_masks_and_gradients(kernel, normalization, mask_name):
    kwargs = dict(mask_cases()[mask_name])
    layer_args = {k: kwargs.pop(k) for k in ('window', 'window_2d') if k in kwargs}
    layer = make_layer(kernel, normalization, **layer_args)
    x = torch.randn(2, N, 12, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    out = layer(x, **kwargs)
    mask = build_mask(N, attn_mask=kwargs.get('attn_mask'), is_causal=kwargs.get('is_causal', False),
                      **layer_args)
    heads = x.detach().view(2, N, 3, 4).transpose(1, 2)
    w = reference_weights(heads, layer.sigma.detach(), DEGREE[kernel], normalization, mask)
    expect = layer.proj((w @ heads).transpose(1, 2).reshape(2, N, 12))
    torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.log_sigma.grad).all()
    assert layer.log_sigma.grad.abs().sum() > 0


@pytest.mark.parametrize('kernel, normalization', COMBOS)
def test_diagonal_always_in_support(kernel, normalization):
    # Tiny and huge bandwidths, duplicated tokens, a random boolean mask that keeps the diagonal.
    x = heads_input(seed=7)
    x[:, :, 5] = x[:, :, 6]
    keep = (torch.rand(N, N, generator=torch.Generator().manual_seed(8)) > 0.5) | torch.eye(N, dtype=torch.bool)
    for h in (1e-3, 0.3, 1.0, 30.0):
        log_sigma = torch.full((3,), math.log(h), dtype=F64)
        for mask in (None, keep):
            w = compact_weights(x.float(), log_sigma.float(), DEGREE[kernel], normalization, mask)
            assert (w.diagonal(dim1=-2, dim2=-1) > 0).all(), (h, mask is None)


@pytest.mark.parametrize('kernel, normalization', COMBOS)
def test_bfloat16_finite_and_close_to_float32(kernel, normalization):
    layer = make_layer(kernel, normalization, dtype=torch.float32, window_2d=1)
    x = torch.randn(2, N, 12, generator=torch.Generator().manual_seed(9))
    expect = layer(x, is_causal=True)
    layer_bf16 = make_layer(kernel, normalization, dtype=torch.bfloat16, window_2d=1)
    xb = x.bfloat16().requires_grad_()
    out = layer_bf16(xb, is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - expect).abs().max() < 0.05
    out.float().sum().backward()
    assert torch.isfinite(xb.grad).all() and torch.isfinite(layer_bf16.log_sigma.grad).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):  # weights stay float32-accurate under autocast
        heads = x.view(2, N, 3, 4).transpose(1, 2)
        w = compact_weights(heads, layer.log_sigma, DEGREE[kernel], normalization)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, compact_weights(heads, layer.log_sigma, DEGREE[kernel], normalization))


def test_one_way_to_build_gka():
    # The Gaussian is GKA's own class; the compact layer refuses it rather than being a second GKA.
    with pytest.raises(ValueError, match="kernel='gaussian' is GKA: build vit_gka.GaussianKernelAttention"):
        KernelAttention(48, 3, kernel='gaussian')
    layer, gka = KernelAttention(48, 3, kernel='biweight', window_2d=1), GaussianKernelAttention(48, 3)
    assert not isinstance(layer, GaussianKernelAttention)  # siblings under one base
    assert isinstance(layer, ProjectionFreeAttention) and isinstance(gka, ProjectionFreeAttention)
    with pytest.raises(TypeError, match='impl'):  # the compact kernels have one (materialised) implementation
        KernelAttention(48, 3, kernel='biweight', impl='flex')


def test_default_bandwidth_and_validation():
    for kernel in DEGREE:
        layer = KernelAttention(64, 4, kernel=kernel)
        torch.testing.assert_close(layer.sigma ** 2, torch.full((4,), 2.0 * 16))  # h^2 = 2 d
    assert torch.allclose(KernelAttention(64, 4, kernel='triweight', sigma_init=2.0).sigma, torch.full((4,), 2.0))
    assert KernelAttention(64, 4).kernel == 'epanechnikov'
    for bad in (dict(kernel='cosine'), dict(normalization='softmax'), dict(kernel='biweight', sigma_init=0.0)):
        with pytest.raises(ValueError):
            KernelAttention(64, 4, **bad)


def test_sparsity_helpers():
    w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    assert attention_sparsity(w).item() == pytest.approx(3 / 9)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert attention_sparsity(w, causal).item() == pytest.approx(1 / 6)  # zeros the mask allows only
    model = timm.create_model('eka_adaptive_deit_tiny_patch16_224', img_size=28, patch_size=4, in_chans=1,
                              num_classes=10, depth=3, window_2d=2)
    x = torch.randn(2, 1, 28, 28)
    with AttentionSparsity(model) as sparsity:
        model(x)
    assert list(sparsity.values) == ['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn']
    assert all(0 < v < 1 for v in sparsity.values.values())
    tokens = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x)))
    w, mask = attention_weights(model.blocks[0].attn, tokens)
    assert sparsity.values['blocks.0.attn'] == pytest.approx(attention_sparsity(w, mask).item())
    model(x)  # hooks removed on exit
    assert len(sparsity.values) == 3
    gka = timm.create_model('gka_deit_tiny_patch16_224', img_size=28, patch_size=4, in_chans=1, num_classes=10,
                            depth=2)
    with AttentionSparsity(gka) as sparsity:
        gka(x)
    assert sparsity.values == {'blocks.0.attn': 0.0, 'blocks.1.attn': 0.0}


def test_model_sparsity():
    """What training logs: per-layer sparsity in model order on one batch, eval mode, mode restored."""
    model = timm.create_model('bka_fixed_deit_tiny_patch16_224', img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, num_heads=2, depth=3, drop_path_rate=0.5).train()
    x = torch.randn(4, 1, 28, 28)
    with AttentionSparsity(model) as meter:
        model.eval()(x)
    model.train()
    result = model_sparsity(model, x)
    assert model.training
    assert result['layers'] == [meter.values[f'blocks.{i}.attn'] for i in range(3)]
    assert result['mean'] == pytest.approx(sum(result['layers']) / 3) and 0 < result['mean'] < 1
    assert model_sparsity(torch.compile(model), x)['layers'] == result['layers']  # measured on _orig_mod
    deit = timm.create_model('deit_tiny_patch16_224', img_size=28, patch_size=7, in_chans=1, depth=1)
    assert model_sparsity(deit, x) is None


def test_registry_names():
    # '?ka_*_deit_*' also matches GKA with data-dependent bandwidths (gka_q_deit_*, gka_k_deit_*)
    assert set(timm.list_models('?ka_*_deit_*')) - set(timm.list_models('gka_[qk]_deit_*')) == set(COMPACT_MODELS)
    assert len(COMPACT_MODELS) == 12
    cfg = timm.models.get_pretrained_cfg('eka_adaptive_deit_small_patch16_224')
    assert cfg.paper_ids == 'arXiv:2601.22766'
    with pytest.raises(RuntimeError, match='no published weights'):
        timm.create_model('eka_fixed_deit_tiny_patch16_224', pretrained=True)
    assert vit_gka.KernelAttention is KernelAttention


@pytest.mark.parametrize('name', sorted(COMPACT_MODELS))
def test_create_forward_backward_28x28(name):
    kernel, normalization = COMPACT_MODELS[name]
    with torch.device('meta'):
        full = timm.create_model(name)
    params = sum(p.numel() for p in full.parameters())
    assert round(params / 1e6, 2) == (4.38 if 'tiny' in name else 16.73)  # = GKA's (paper Table 2)
    model = timm.create_model(name, img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=2,
                              window_2d=2, sigma_init=3.0)
    attn = model.blocks[0].attn
    assert (attn.kernel, attn.normalization, attn.window_2d, attn.grid_size) == (kernel, normalization, 2, (7, 7))
    assert torch.allclose(attn.sigma, torch.full_like(attn.sigma, 3.0))
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
