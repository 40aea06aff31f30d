"""The one materialisation of attention weights for analysis (``layer.weights`` / ``attention_weights``): it is
the weights the layer's forward applies, masks included, and the attention-distance analysis uses it."""
import pytest
import timm
import torch

from vit_gka import GaussianKernelAttention, KernelAttention
from vit_gka.measure.attention import attention_weights, mean_attention_distance
from vit_gka.layers.masks import build_mask

from helpers import N, masks

LAYERS = {  # eps ~ 0: the fused GKA has no eps, the materialised weights (Eq. 4) do
    'gka reference': lambda **kw: GaussianKernelAttention(12, 3, impl='reference', **kw),
    'gka auto': lambda **kw: GaussianKernelAttention(12, 3, eps=1e-30, **kw),
    **{f'{k} {n}': (lambda k=k, n=n, **kw: KernelAttention(12, 3, kernel=k, normalization=n, **kw))
       for k in ('epanechnikov', 'biweight', 'triweight') for n in ('fixed', 'adaptive')},
}


@pytest.mark.parametrize('mask_name', ['none', 'window_causal', 'window_2d', 'bool'])
@pytest.mark.parametrize('layer_name', list(LAYERS))
def test_weights_are_what_forward_applies(layer_name, mask_name):
    kwargs = dict(masks(N, 2, dtype=torch.float64)[mask_name])
    layer_args = {k: kwargs.pop(k) for k in ('window', 'window_2d') if k in kwargs}
    torch.manual_seed(0)
    layer = LAYERS[layer_name](**layer_args).double().eval()
    x = torch.randn(2, N, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = layer.weights(x, **kwargs)
    assert w.shape == (2, 3, N, N) and w.dtype == torch.float64
    torch.testing.assert_close(layer.merge_heads(w @ layer.split_heads(x)), layer(x, **kwargs), rtol=1e-9, atol=1e-9)
    mask = build_mask(N, attn_mask=kwargs.get('attn_mask'), is_causal=kwargs.get('is_causal', False), **layer_args)
    if mask is not None:
        assert (w[~mask.expand_as(w)] == 0).all()
    got, got_mask = attention_weights(layer, x, **kwargs)
    assert torch.equal(got, w) and (got_mask is None) == (mask is None)


def window_distance(grid, radius):
    """Mean Euclidean distance from a patch to the patches of its Chebyshev neighbourhood, over all patches."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    p = torch.stack([ys.flatten(), xs.flatten()], -1).float()
    near = (p[:, None] - p[None]).abs().amax(-1) <= radius
    dist = torch.cdist(p, p)
    return ((dist * near).sum(-1) / near.sum(-1)).mean().item()


def test_attention_distance_sees_the_window():
    """A very wide kernel under a 2-D window of radius 1 attends uniformly within the window only."""
    torch.manual_seed(0)
    model = timm.create_model('gka_deit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=64, depth=1,
                              num_heads=2, num_classes=3, window_2d=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.blocks[0].attn.log_sigma.fill_(12.0)
        tokens = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x)))
    w, mask = attention_weights(model.blocks[0].attn, tokens)
    outside = ~mask.expand_as(w)
    assert outside.sum() > 0 and (w[outside] == 0).all()
    dist = mean_attention_distance(model, x)
    expect = window_distance(4, 1)
    assert expect < window_distance(4, 4)  # the unmasked (uniform over the grid) value is larger
    assert dist == pytest.approx(torch.full((1, 2), expect), rel=1e-4)


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'vlt_deit_tiny_patch16_224'])
def test_softmax_weights_take_the_callers_mask(name):
    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2).eval()
    x = torch.randn(2, 17, 64)
    w, mask = attention_weights(model.blocks[0].attn, x, is_causal=True)
    assert w.shape == (2, 2, 17, 17) and torch.equal(w.triu(1), torch.zeros_like(w))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 17))
    assert attention_weights(model.blocks[0].attn, x)[1] is None
