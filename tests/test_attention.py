"""GKA's fused backends against the paper's materialised form (Eq. 2-7), masks, dtypes, stability."""
import math

import pytest
import torch

from vit_gka import GaussianKernelAttention
from vit_gka.layers.gka import gka_reference
from vit_gka.layers.gka_backends import gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.masks import build_mask, window_1d_mask, window_2d_mask

from helpers import N, masks

FUSED = {'sdpa_pad': gka_sdpa_pad, 'sdpa_bias': gka_sdpa_bias}
def naive_kernel_attention(x, sigma, allowed, eps=0.0):
    """GKA written from the formulas with loops over heads: K, W and y of Eq. 2-5 and Eq. 7."""
    out = torch.zeros_like(x)
    for h in range(x.shape[1]):
        xh = x[:, h]
        d2 = (xh[:, :, None, :] - xh[:, None, :, :]).pow(2).sum(-1)
        k = torch.exp(-d2 / (2 * sigma[h] ** 2)) * allowed
        out[:, h] = (k / (k.sum(-1, keepdim=True) + eps)) @ xh
    return out


@pytest.mark.parametrize('impl', ['reference', *FUSED])
def test_matches_formula_written_out(impl):
    torch.manual_seed(0)
    x = torch.randn(2, 3, N, 8, dtype=torch.float64)
    log_sigma = torch.randn(3, dtype=torch.float64) * 0.3
    allowed = window_2d_mask(N, 2).double()
    mask = build_mask(N, window_2d=2)
    fn = (lambda *a: gka_reference(*a, eps=0.0)) if impl == 'reference' else FUSED[impl]
    expect = naive_kernel_attention(x, log_sigma.exp(), allowed)
    torch.testing.assert_close(fn(x, log_sigma, mask), expect, rtol=1e-10, atol=1e-10)


def outputs_and_grads(module, x, kwargs):
    kwargs = dict(kwargs)
    for name in ('window', 'window_2d'):  # constructor arguments of the layer
        setattr(module, name, kwargs.pop(name, None))
    x = x.clone().requires_grad_()
    out = module(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    return [out, x.grad, module.log_sigma.grad, module.proj.weight.grad, module.proj.bias.grad]


def pair(impl, dtype):
    torch.manual_seed(1)
    ref = GaussianKernelAttention(48, 3, impl='reference', eps=1e-30)  # eps=0 is 0/0 on empty rows
    with torch.no_grad():
        ref.log_sigma.copy_(torch.tensor([-0.2, 0.4, 1.0]))
    fused = GaussianKernelAttention(48, 3, impl=impl)
    fused.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype)


@pytest.mark.parametrize('scale', [0.1, 0.3, 1.0])
@pytest.mark.parametrize('mask_name', list(masks()))
@pytest.mark.parametrize('impl', list(FUSED))
def test_fused_equals_reference_float32(impl, mask_name, scale):
    # LayerNorm'd tokens have unit-scale entries: 1e-5 relative to each tensor's magnitude (5e-5 for
    # d log_sigma). Beyond that scale float32 d log_sigma of the dot-product form loses ~1e-4 to
    # cancellation (||x||^2 - 2 x.y + ||y||^2); the float64 test below shows the formulations agree.
    ref, fused = pair(impl, torch.float32)
    x = torch.randn(2, N, 48, generator=torch.Generator().manual_seed(7)) * scale
    expect = outputs_and_grads(ref, x, masks()[mask_name])
    got = outputs_and_grads(fused, x, masks()[mask_name])
    for name, g, e in zip(['out', 'd x', 'd log_sigma', 'd proj.weight', 'd proj.bias'], got, expect):
        tol = 5e-5 if name == 'd log_sigma' else 1e-5  # a sum over B*H*N*N terms with cancellation
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()), msg=name)


@pytest.mark.parametrize('scale', [0.1, 3.0, 10.0])
@pytest.mark.parametrize('mask_name', ['none', 'window_causal', 'window_2d', 'bool'])
@pytest.mark.parametrize('impl', list(FUSED))
def test_fused_equals_reference_float64_any_scale(impl, mask_name, scale):
    # In float64 the identity is exact at any input scale: no float32 cancellation left to hide behind.
    ref, fused = pair(impl, torch.float64)
    x = torch.randn(2, N, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * scale
    expect = outputs_and_grads(ref, x, masks()[mask_name])
    for g, e in zip(outputs_and_grads(fused, x, masks()[mask_name]), expect):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize('impl', ['reference', 'auto', *FUSED])
def test_fully_masked_rows_are_zero_not_nan(impl):
    attn = GaussianKernelAttention(32, 4, impl=impl)
    x = torch.randn(2, 10, 32, requires_grad=True)
    allowed = torch.ones(2, 10, 10, dtype=torch.bool)
    allowed[0, 3] = False
    allowed[1, :] = False
    attn.proj = torch.nn.Identity()  # the concatenated heads as the layer computes them, before W_O
    core = attn(x, attn_mask=allowed).view(2, 10, 4, 8).transpose(1, 2)
    assert torch.isfinite(core).all()
    assert core[0, :, 3].abs().max() == 0 and core[1].abs().max() == 0
    assert core[0, :, 2].abs().max() > 0
    core.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(attn.log_sigma.grad).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('impl', ['reference', 'auto', *FUSED])
def test_large_norms_stay_finite(impl, dtype):
    torch.manual_seed(2)
    attn = GaussianKernelAttention(128, 2, impl=impl).to(dtype)
    x = torch.randn(2, 20, 2, 64)
    x = (x / x.norm(dim=-1, keepdim=True) * torch.logspace(0, 3, 20).view(1, 20, 1, 1)).reshape(2, 20, 128)
    x = x.to(dtype).requires_grad_()
    for kwargs in ({}, {'is_causal': True}):
        out = attn(x, **kwargs)
        assert torch.isfinite(out).all(), (impl, dtype, kwargs)
        out.float().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(attn.log_sigma.grad).all()


def test_low_precision_close_to_float32():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 197, 64)
    ls = torch.full((4,), math.log(64 ** 0.25))
    expect = gka_reference(x, ls)
    for dtype in (torch.bfloat16, torch.float16):
        for fn in FUSED.values():
            got = fn(x.to(dtype), ls).float()
            assert (got - expect).abs().max() < 0.1, (fn.__name__, dtype)


def test_masks_follow_the_paper_definitions():
    causal_w = window_1d_mask(6, 3, causal=True)
    assert causal_w[4].tolist() == [False, False, True, True, True, False]  # i - W < j <= i
    both = window_1d_mask(6, 2, causal=False)
    assert both[3].tolist() == [False, False, True, True, True, False]  # |i - j| < W
    grid = window_2d_mask(1 + 16, 1)  # class token + 4 x 4 grid
    assert grid[0].all() and grid[:, 0].all()  # the class token sees and is seen by all
    row = grid[1 + 5, 1:].view(4, 4)  # patch (1, 1)
    assert row.sum() == 9 and row[:3, :3].all()
    assert torch.equal(build_mask(6, window=3, is_causal=True), causal_w)


def test_sigma_init_and_validation():
    attn = GaussianKernelAttention(64, 4)
    assert torch.allclose(attn.sigma ** 2, torch.full((4,), 16 ** 0.5))  # sigma^2 = sqrt(d)
    assert torch.allclose(GaussianKernelAttention(64, 4, sigma_init=2.0).sigma, torch.full((4,), 2.0))
    for bad in (dict(sigma_init=0.0), dict(sigma_init=-1.0), dict(window=0), dict(impl='nope')):
        with pytest.raises(ValueError):
            GaussianKernelAttention(64, 4, **bad)


def test_attention_dropout_acts_on_weights():
    torch.manual_seed(0)
    attn = GaussianKernelAttention(32, 2, attn_drop=0.5, impl='reference').train()
    x = torch.randn(1, 12, 32)
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('mask_name', list(masks()))
def test_flex_matches_reference_forward(mask_name):
    # CPU flex is forward-only in torch 2.14 (eager, unfused); CUDA runs it compiled, with gradients.
    ref, flex = pair('flex', torch.float64)
    kwargs = dict(masks()[mask_name])
    for name in ('window', 'window_2d'):
        for module in (ref, flex):
            setattr(module, name, kwargs.get(name))
        kwargs.pop(name, None)
    x = torch.randn(2, N, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(flex(x, **kwargs), ref(x, **kwargs), rtol=1e-9, atol=1e-9)


def test_auto_picks_by_device_and_mask():
    from vit_gka.layers.gka_backends import auto_impl
    cpu = torch.zeros(1)
    assert auto_impl(cpu, masked=False) == 'sdpa_bias' and auto_impl(cpu, masked=True) == 'sdpa_pad'
    assert auto_impl(cpu, masked=True, windowed=True) == 'sdpa_pad'  # no flex backward on the CPU
    with pytest.raises(ValueError, match='flex'):
        GaussianKernelAttention(32, 2, impl='flex', attn_drop=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize('impl', ['sdpa_pad', 'sdpa_bias', 'flex'])
def test_cuda_backends_match_reference_with_grads(impl):
    torch.manual_seed(0)
    ref, fused = pair(impl, torch.float32)
    ref, fused = ref.cuda(), fused.cuda()
    x = torch.randn(2, N, 48, device='cuda')
    expect, got = outputs_and_grads(ref, x, {'window_2d': 1}), outputs_and_grads(fused, x, {'window_2d': 1})
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize('options', [dict(width=128), dict(narrow_v=True)])
def test_padded_form_options_match_formula(options):
    # q' = [x / sigma^2, 1, ...], k' = [x, b, 0, ...] at any width >= d + 1, and v = x at the head's own width
    torch.manual_seed(0)
    x = torch.randn(2, 3, N, 8, dtype=torch.float64)
    log_sigma = torch.randn(3, dtype=torch.float64) * 0.3
    expect = naive_kernel_attention(x, log_sigma.exp(), torch.ones(N, N, dtype=torch.float64))
    torch.testing.assert_close(gka_sdpa_pad(x, log_sigma, **options), expect, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_cuda_bf16_model_close_to_reference():
    # The whole model under bf16 autocast, fused (auto) against the materialised reference with the same
    # weights: logits and the bandwidths' gradients agree to bf16's precision.
    import timm
    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    fused = timm.create_model('gka_deit_tiny_patch16_224', **kwargs).cuda()
    ref = timm.create_model('gka_deit_tiny_patch16_224', impl='reference', **kwargs).cuda()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(8, 3, 64, 64, device='cuda')
    outs = []
    for model in (fused, ref):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            logits = model(x).float()
        logits.square().mean().backward()
        outs.append((logits, model.blocks[0].attn.log_sigma.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0.05, atol=0.05)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0.1, atol=0.1 * outs[1][1].abs().max().item())
