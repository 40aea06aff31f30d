"""Data-dependent bandwidths (vit_gka/layers/bandwidths.py, models gka_q_deit_* / gka_k_deit_*): the fused widened-head
form against the materialised definition (values and gradients, every mask kind of the GKA tests), a = 0 against GKA,
the registry, parameter and FLOP accounting, and one-line errors for bad input."""
import math
import warnings

import pytest
import timm
import torch

from vit_gka import GaussianKernelAttention, VariableBandwidthAttention
from vit_gka.measure.benchmark import baseline_name
from vit_gka.measure.flops import model_stats
from vit_gka.layers.bandwidths import variable_reference, variable_sdpa
from vit_gka.layers.masks import build_mask, window_2d_mask

from helpers import N, masks

BANDWIDTHS = ['query', 'key']
FUSED = ['sdpa_pad', 'sdpa']
MODEL = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10)


def naive_variable_attention(x, log_sigma, a, bandwidth, allowed):
    """Written from the definition with loops over heads and direct differences: sigma_i = exp(log_sigma_h + a_h.x_i),
    K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)) with sigma_i (per query) or sigma_j (per key), K / row sum, W x."""
    out = torch.zeros_like(x)
    for h in range(x.shape[1]):
        xh = x[:, h]
        sigma = torch.exp(log_sigma[h] + xh @ a[h])  # (B, N)
        two_var = 2 * (sigma[:, :, None] if bandwidth == 'query' else sigma[:, None, :]) ** 2
        k = torch.exp(-(xh[:, :, None, :] - xh[:, None, :, :]).pow(2).sum(-1) / two_var) * allowed
        out[:, h] = (k / k.sum(-1, keepdim=True)) @ xh
    return out


def layer(bandwidth, impl, a_std=0.03, log_sigma=(0.1, 0.4, 1.0), **kwargs):
    """A (48, 3 heads of 16) layer with bandwidths varying by token: log sigma_i spans about log_sigma_h +- 0.5 on
    unit-scale tokens, narrowest sigma^2 ~ 0.45 (GKA's tests go down to 0.67)."""
    torch.manual_seed(1)
    attn = VariableBandwidthAttention(48, 3, bandwidth=bandwidth, impl=impl, **kwargs)
    with torch.no_grad():
        attn.log_sigma.copy_(torch.tensor(log_sigma))
        attn.log_sigma_proj.normal_(0.0, a_std, generator=torch.Generator().manual_seed(2))
    return attn


def pair(bandwidth, impl, dtype=torch.float32, **kwargs):
    ref = layer(bandwidth, 'reference', eps=1e-30, **kwargs)  # eps=0 is 0/0 on fully masked rows
    fused = layer(bandwidth, impl, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype)


def outputs_and_grads(module, x, kwargs):
    """Output and the gradients of a fixed projection of it w.r.t. x, log_sigma, a and W_O."""
    kwargs = dict(kwargs)
    for name in ('window', 'window_2d'):  # constructor arguments of the layer
        setattr(module, name, kwargs.pop(name, None))
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = module(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    grads = {'out': out, 'd x': x.grad, 'd log_sigma': module.log_sigma.grad,
             'd proj.weight': module.proj.weight.grad, 'd proj.bias': module.proj.bias.grad}
    return grads if not hasattr(module, 'log_sigma_proj') else {**grads, 'd a': module.log_sigma_proj.grad}


def assert_all_close(got, expect, tol):
    for name, e in expect.items():
        torch.testing.assert_close(got[name], e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()), msg=name)


@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
@pytest.mark.parametrize('impl', ['reference', *FUSED])
def test_matches_the_definition_written_out(bandwidth, impl):
    torch.manual_seed(0)
    x = torch.randn(2, 3, N, 8, dtype=torch.float64)
    log_sigma = torch.randn(3, dtype=torch.float64) * 0.3
    a = torch.randn(3, 8, dtype=torch.float64) * 0.2
    expect = naive_variable_attention(x, log_sigma, a, bandwidth, window_2d_mask(N, 2).double())
    mask = build_mask(N, window_2d=2)
    got = (variable_reference(x, log_sigma, a, bandwidth, mask, eps=0.0) if impl == 'reference' else
           variable_sdpa(x, log_sigma, a, bandwidth, mask, pad=impl == 'sdpa_pad'))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('scale', [0.3, 1.0])
@pytest.mark.parametrize('mask_name', list(masks()))
@pytest.mark.parametrize('impl', FUSED)
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_fused_equals_reference_float32(bandwidth, impl, mask_name, scale):
    """Values and gradients (x, log_sigma, a, W_O) to 1e-5 relative to each tensor's magnitude, every mask."""
    ref, fused = pair(bandwidth, impl)
    x = torch.randn(2, N, 48, generator=torch.Generator().manual_seed(7)) * scale
    assert_all_close(outputs_and_grads(fused, x, masks()[mask_name]),
                     outputs_and_grads(ref, x, masks()[mask_name]), 1e-5)


@pytest.mark.parametrize('scale', [0.1, 3.0])
@pytest.mark.parametrize('mask_name', ['none', 'window_causal', 'window_2d', 'bool'])
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_fused_equals_reference_float64_any_scale(bandwidth, mask_name, scale):
    # Every row sees itself (K_ii = 1), so the materialised form cannot underflow to an empty row: exact at any
    # scale and for widely varying bandwidths (a 5x larger than above).
    ref, fused = pair(bandwidth, 'sdpa_pad', torch.float64, a_std=0.15)
    x = torch.randn(2, N, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * scale
    assert_all_close(outputs_and_grads(fused, x, masks()[mask_name]),
                     outputs_and_grads(ref, x, masks()[mask_name]), 1e-9)


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('mask_name', list(masks()))
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_flex_matches_reference_forward(bandwidth, mask_name):
    # CPU flex is forward-only in torch 2.14 (eager, unfused); CUDA runs it compiled, with gradients.
    ref, flex = pair(bandwidth, 'flex', torch.float64)
    kwargs = dict(masks(dtype=torch.float64)[mask_name])
    for name in ('window', 'window_2d'):
        value = kwargs.pop(name, None)
        setattr(ref, name, value)
        setattr(flex, name, value)
    x = torch.randn(2, N, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(flex(x, **kwargs), ref(x, **kwargs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('mask_name', list(masks()))
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_a_zero_is_gka(bandwidth, mask_name):
    """With a = 0 (a fresh layer) the materialised forms are GKA's bit for bit (output and d x; d log_sigma to float
    rounding: GKA sums it per head, here per token first); the fused forms equal GKA's to float rounding, with GKA's
    tolerance for d log_sigma (5e-5, test_attention.py): GKA's fused d log_sigma is the less accurate one there
    (2e-5 against float64, 4e-6 for these layers; layers/bandwidths.py says why)."""
    x = torch.randn(2, N, 48, generator=torch.Generator().manual_seed(7))
    for impl in ('reference', 'sdpa_pad'):
        torch.manual_seed(1)
        gka = GaussianKernelAttention(48, 3, impl=impl)
        with torch.no_grad():
            gka.log_sigma.copy_(torch.tensor([-0.2, 0.4, 1.0]))
        var = VariableBandwidthAttention(48, 3, bandwidth=bandwidth, impl=impl)
        assert not var.log_sigma_proj.any()
        var.load_state_dict({**gka.state_dict(), 'log_sigma_proj': var.log_sigma_proj.detach()})
        expect = outputs_and_grads(gka, x, masks()[mask_name])
        got = outputs_and_grads(var, x, masks()[mask_name])
        if impl == 'reference':
            for name in ('out', 'd x', 'd proj.weight', 'd proj.bias'):
                assert torch.equal(got.pop(name), expect.pop(name)), name
        assert_all_close({'d log_sigma': got.pop('d log_sigma')}, {'d log_sigma': expect.pop('d log_sigma')}, 5e-5)
        assert_all_close(got, expect, 1e-5)


@pytest.mark.parametrize('impl', ['reference', 'auto', *FUSED])
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_fully_masked_rows_are_zero_not_nan(bandwidth, impl):
    attn = layer(bandwidth, impl)
    x = torch.randn(2, 10, 48, requires_grad=True)
    allowed = torch.ones(2, 10, 10, dtype=torch.bool)
    allowed[0, 3] = False
    allowed[1, :] = False
    core = attn.core(attn.split_heads(x), allowed, False)
    assert torch.isfinite(core).all()
    assert core[0, :, 3].abs().max() == 0 and core[1].abs().max() == 0 and core[0, :, 2].abs().max() > 0
    core.sum().backward()
    assert all(torch.isfinite(t).all() for t in (x.grad, attn.log_sigma.grad, attn.log_sigma_proj.grad))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_large_norms_stay_finite(bandwidth, dtype):
    """Per-head norms 1 to 1000 (GKA's test) with a = 0, and 1 to 30 with a != 0: sigma = exp(log_sigma + a.x) is
    exponential in x, so a.x beyond ~40 overflows 1 / sigma^2 in float32 / bfloat16 by definition (float16: ~5)."""
    for a_std, top in ((0.0, 3.0), (0.03, 1.5)):
        attn = layer(bandwidth, 'auto', a_std=a_std).to(dtype)
        x = torch.randn(2, 20, 3, 16)
        x = (x / x.norm(dim=-1, keepdim=True) * torch.logspace(0, top, 20).view(1, 20, 1, 1)).reshape(2, 20, 48)
        x = x.to(dtype).requires_grad_()
        for kwargs in ({}, {'is_causal': True}):
            out = attn(x, **kwargs)
            assert torch.isfinite(out).all(), (a_std, kwargs)
            out.float().sum().backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(attn.log_sigma_proj.grad).all()


def test_low_precision_close_to_float32():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 197, 64)
    log_sigma = torch.full((4,), math.log(64 ** 0.25))
    a = torch.randn(4, 64) * 0.02
    for bandwidth in BANDWIDTHS:
        expect = variable_reference(x, log_sigma, a, bandwidth)
        for dtype in (torch.bfloat16, torch.float16):
            got = variable_sdpa(x.to(dtype), log_sigma, a, bandwidth).float()
            assert (got - expect).abs().max() < 0.1, (bandwidth, dtype)


@pytest.mark.parametrize('mask_name', ['none', 'window_causal', 'window_2d', 'bool'])
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_weights_are_what_forward_applies(bandwidth, mask_name):
    kwargs = dict(masks(dtype=torch.float64)[mask_name])
    attn = layer(bandwidth, 'auto', eps=1e-30, a_std=0.1,
                 **{k: kwargs.pop(k) for k in ('window', 'window_2d') if k in kwargs}).double().eval()
    x = torch.randn(2, N, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = attn.weights(x, **kwargs)
    assert w.shape == (2, 3, N, N) and w.dtype == torch.float64
    torch.testing.assert_close(attn.merge_heads(w @ attn.split_heads(x)), attn(x, **kwargs), rtol=1e-9, atol=1e-9)
    mask = build_mask(N, attn_mask=kwargs.get('attn_mask'), is_causal=kwargs.get('is_causal', False),
                      window=attn.window, window_2d=attn.window_2d)
    if mask is not None:
        assert (w[~mask.expand_as(w)] == 0).all()


def test_attention_dropout_acts_on_weights():
    attn = layer('key', 'auto', attn_drop=0.5).train()
    x = torch.randn(1, 12, 48)
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))


def test_bad_input_is_a_one_line_error():
    attn = VariableBandwidthAttention(48, 3, bandwidth='key')
    x = torch.randn(2, 10, 48)
    for mask in (torch.ones(11, 11, dtype=torch.bool), torch.ones(3, 10, 10, dtype=torch.bool),
                 torch.ones(2, 2, 10, 10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r'attn_mask of shape .* does not fit 2 x 10 tokens and 3 heads') as e:
            attn(x, attn_mask=mask)
        assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='boolean .* or float'):
        attn(x, attn_mask=torch.ones(10, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r'takes tokens \(B, N, 48\), got shape \(2, 10, 32\)'):
        attn(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match='attn_mask of shape'):
        attn.weights(x, attn_mask=torch.ones(9, 9, dtype=torch.bool))
    for bad, message in ((dict(bandwidth='row'), "bandwidth='row' is not one of"),
                         (dict(impl='sdpa_bias'), 'no additive-bias form'), (dict(impl='nope'), 'is not one of'),
                         (dict(impl='flex', attn_drop=0.1), 'no attention dropout'), (dict(sigma_init=0.0), '> 0'),
                         (dict(window=0), 'window must be')):
        with pytest.raises(ValueError, match=message):
            VariableBandwidthAttention(48, 3, **bad)
    for mask in (torch.ones(10, 10, dtype=torch.bool), torch.zeros(2, 10, 10), torch.ones(2, 3, 10, 10) > 0):
        assert attn(x, attn_mask=mask).shape == x.shape  # the shapes GKA takes


# ------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize('bandwidth', ['q', 'k'])
def test_registry_forward_backward(bandwidth):
    model = timm.create_model(f'gka_{bandwidth}_deit_tiny_patch16_224', **MODEL)
    attn = model.blocks[0].attn
    assert isinstance(attn, VariableBandwidthAttention) and attn.bandwidth == {'q': 'query', 'k': 'key'}[bandwidth]
    assert attn.grid_size == (4, 4) and not attn.log_sigma_proj.any()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert attn.log_sigma_proj.grad.abs().sum() > 0  # a starts at 0 but learns


def test_every_size_is_registered_and_fresh_models_compute_gka():
    names = set(timm.list_models('gka_[qk]_deit_*'))
    assert names == {f'gka_{b}_deit_{s}' for b in 'qk' for s in (
        'tiny_patch16_224', 'small_patch16_224', 'base_patch16_224', 'base_patch16_384')}
    assert baseline_name('gka_q_deit_small_patch16_224') == 'deit_small_patch16_224'
    torch.manual_seed(0)
    gka = timm.create_model('gka_deit_tiny_patch16_224', impl='reference', **MODEL).eval()
    x = torch.randn(2, 1, 28, 28)
    for bandwidth in 'qk':
        model = timm.create_model(f'gka_{bandwidth}_deit_tiny_patch16_224', impl='reference', **MODEL).eval()
        missing, unexpected = model.load_state_dict(gka.state_dict(), strict=False)
        assert not unexpected and all(k.endswith('log_sigma_proj') for k in missing)
        with torch.no_grad():
            assert torch.equal(model(x), gka(x))


@pytest.mark.parametrize('size, heads, dim', [('tiny', 3, 192), ('small', 6, 384), ('base', 12, 768)])
def test_parameter_count_is_gka_plus_depth_heads_head_dim(size, heads, dim):
    counts = {}
    for family in ('gka', 'gka_q', 'gka_k'):
        with torch.device('meta'):
            model = timm.create_model(f'{family}_deit_{size}_patch16_224')
        counts[family] = sum(p.numel() for p in model.parameters())
    assert counts['gka_q'] - counts['gka'] == counts['gka_k'] - counts['gka'] == 12 * heads * (dim // heads)


def analytic_macs(family, dim=192, heads=3, depth=2, img=64, patch=16, in_chans=3, classes=1000):
    """MACs for one image, written out (fvcore's conventions: LayerNorm 5 per element, SDPA q.k + W v)."""
    patches = (img // patch) ** 2
    n = patches + 1
    extra = {'gka': 0, 'gka_q': 2, 'gka_k': 2}[family]  # widened head: d + 2 columns in q'.k'
    layer_norm = 5 * n * dim
    block = (2 * layer_norm
             + (n * dim if extra else 0)                # bandwidth projection a_h . x_i: N x d per head
             + n * n * (2 * dim + heads * extra)        # scores over d + extra per head, weighted sum over d
             + n * dim * dim                            # W_O
             + 2 * n * dim * 4 * dim)                   # MLP
    return patches * in_chans * patch * patch * dim + depth * block + layer_norm + dim * classes


@pytest.mark.parametrize('impl', ['auto', 'sdpa_pad', 'reference'])
def test_flops_count_the_projection_and_the_widened_head(impl):
    for family in ('gka', 'gka_q', 'gka_k'):
        args = dict(img_size=64, depth=2) if family == 'gka' else dict(img_size=64, depth=2, impl=impl)
        model = timm.create_model(f'{family}_deit_tiny_patch16_224', **args)
        stats = model_stats(model)
        assert stats['unsupported'] == [], family
        assert stats['gmacs'] * 1e9 == pytest.approx(analytic_macs(family), rel=1e-12), family
        if family != 'gka':
            assert stats['macs_by_op']['matmul'] == 2 * 17 * 192  # depth x N x D: the bandwidth projection
            assert stats['params_attn'] == 2 * (192 * 192 + 192 + 3 + 192)
            assert model.blocks[0].attn.impl == impl  # restored after counting


def test_any_timm_vit_takes_the_layers_by_name(tmp_path):
    model = timm.create_model('vit_tiny_patch16_224', attn_layer='gka_k', img_size=32, patch_size=8, depth=1,
                              num_classes=3).eval()
    attn = model.blocks[0].attn
    assert isinstance(attn, VariableBandwidthAttention) and attn.bandwidth == 'key'
    with torch.no_grad():
        attn.log_sigma_proj.normal_(0.0, 0.05)
    timm.models.save_for_hf(model, str(tmp_path / 'hf'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert loaded.blocks[0].attn.bandwidth == 'key'
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('name, attn_args, train', [('gka_q_deit_tiny_patch16_224', {'window_2d': 1}, True),
                                                     ('gka_k_deit_tiny_patch16_224', {}, False)])
def test_no_graph_breaks(name, attn_args, train):
    model = timm.create_model(name, drop_path_rate=0.1, depth=2, **attn_args, **MODEL).train(train)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 1, 28, 28))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.gpu
@pytest.mark.parametrize('impl', ['sdpa_pad', 'flex'])
@pytest.mark.parametrize('bandwidth', BANDWIDTHS)
def test_cuda_backends_match_reference_with_grads(bandwidth, impl):
    ref, fused = pair(bandwidth, impl)
    ref, fused = ref.cuda(), fused.cuda()
    x = torch.randn(2, N, 48, device='cuda', generator=torch.Generator('cuda').manual_seed(0))
    assert_all_close(outputs_and_grads(fused, x, {'window_2d': 1}), outputs_and_grads(ref, x, {'window_2d': 1}), 1e-4)
