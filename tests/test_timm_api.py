"""Every registered model behaves like timm's DeiT under timm's model API: features_only (FeatureGetterNet),
torch.fx feature extraction, forward_intermediates / prune_intermediate_layers, set_input_size and
dynamic_img_size (the 2-D window follows the new patch grid), gradient checkpointing, reset_classifier."""
import pytest
from timm.models._features import FeatureGetterNet
import timm
import torch

from vit_gka.layers import ProjectionFreeAttention
from vit_gka.layers.masks import window_2d_mask

NAMES = timm.list_models(['gka_deit_*', 'vlt_deit_*', '?ka_*_deit_*'])  # the last matches gka_[qk]_deit_* too
# One per family (gka, gka_q, gka_k, vlt, six compact): the small / base entry points differ from these in the default
# shape only, which SMALL overrides; the heavier tests (backward passes) run on these.
FAMILIES = [n for n in NAMES if '_tiny_' in n]
SMALL = dict(img_size=32, patch_size=8, in_chans=3, depth=2, embed_dim=64, num_heads=4, num_classes=5)  # 4 x 4 patches


def create(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**SMALL, **kwargs}).eval()


def attn_args(name):
    """A 2-D window for the kernel attentions (VLT takes none)."""
    return {} if name.startswith('vlt_') else {'window_2d': 1}


def kernel_layers(model):
    return [m for m in model.modules() if isinstance(m, ProjectionFreeAttention)]


def images(h=32, w=32, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_every_family_is_listed():
    assert len(NAMES) == 5 + 4 + 4 + 3 + 12 and len(FAMILIES) == 10  # GKA: 4 ImageNet shapes + the Fashion-MNIST one


@pytest.mark.parametrize('name, explicit', [(n, False) for n in NAMES] + [(n, True) for n in FAMILIES])
def test_features_only_is_a_feature_getter(name, explicit):
    kwargs = dict(feature_cls='getter') if explicit else {}
    features = create(name, features_only=True, out_indices=(0, 1), **attn_args(name), **kwargs)
    assert isinstance(features, FeatureGetterNet)
    assert features.feature_info.channels() == [64, 64] and features.feature_info.reduction() == [8, 8]
    assert all(m.grid_size == (4, 4) and m.num_prefix_tokens == 1 for m in kernel_layers(features))
    full = create(name, **attn_args(name))
    x = images()
    with torch.no_grad():
        got, expect = features(x), full.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert [f.shape for f in got] == [(2, 64, 4, 4)] * 2
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize('name', NAMES)
def test_fx_feature_extraction(name):
    model = create(name, **attn_args(name))
    train_nodes, eval_nodes = timm.models.get_graph_node_names(model)
    assert 'blocks.1.attn' in eval_nodes  # the attention is one leaf node
    extractor = timm.models.create_feature_extractor(model, return_nodes={'blocks.0': 'mid', 'norm': 'out'})
    x = images()
    caught = {}
    handle = model.blocks[0].register_forward_hook(lambda m, a, out: caught.setdefault('mid', out))
    with torch.no_grad():
        feats = extractor(x)
        expect = model.forward_features(x)
    handle.remove()
    torch.testing.assert_close(feats['mid'], caught['mid'], rtol=0, atol=0)
    torch.testing.assert_close(feats['out'], expect, rtol=0, atol=0)


@pytest.mark.parametrize('attn', [{}, {'window_2d': 1}, {'impl': 'triton'}])
def test_torchvision_fx_feature_extraction(attn):
    """torchvision's own create_feature_extractor, which knows none of timm's leaf modules, traces GKA models: the
    backend call and the mask are graph nodes, the traced graph the portable fused path."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = create('gka_deit_tiny_patch16_224', **attn)
    extractor = create_feature_extractor(model, return_nodes={'blocks.1.attn': 'attn', 'norm': 'out'})
    x = images()
    with torch.no_grad():
        feats = extractor(x)
        expect = model.forward_features(x)
    assert feats['attn'].shape == (2, 17, 64)
    torch.testing.assert_close(feats['out'], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', FAMILIES)
def test_intermediates_prune_checkpointing_and_classifier(name):
    model = create(name, **attn_args(name))
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=2, norm=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [f.shape for f in inter] == [(2, 64, 4, 4)] * 2
        nlc = model.forward_intermediates(x, indices=[0], output_fmt='NLC', intermediates_only=True)
    assert nlc[0].shape == (2, 16, 64)

    model.train()  # gradient checkpointing: the same gradients (no dropout or drop path here)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    model.eval()

    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    assert model.prune_intermediate_layers(indices=[0]) == [0] and len(model.blocks) == 1
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        first = create(name, **attn_args(name)).forward_intermediates(x, indices=[0], intermediates_only=True)
    torch.testing.assert_close(pruned[0], first[0], rtol=0, atol=0)


def expected_window(grid):
    n = 1 + grid[0] * grid[1]
    return window_2d_mask(n, 1, grid_size=grid, num_prefix_tokens=1)


@pytest.mark.parametrize('name', NAMES)
def test_set_input_size_and_dynamic_img_size_move_the_window(name):
    # A non-square grid: a window left on the old 4 x 4 grid could not even place the 25 tokens.
    dynamic = create(name, dynamic_img_size=True, **attn_args(name))
    static = create(name, **attn_args(name))
    static.load_state_dict(dynamic.state_dict())
    static.set_input_size(img_size=(48, 32))
    tall = images(48, 32)
    with torch.no_grad():
        expect = static(tall)
        got = dynamic(tall)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    for model in (static, dynamic):
        for layer in kernel_layers(model):
            assert (layer.grid_size, layer.num_prefix_tokens) == ((6, 4), 1)
            assert torch.equal(layer.mask(25, 'cpu'), expected_window((6, 4)))
    with torch.no_grad():  # back at the original size, the window follows again
        dynamic(images())
        inter = dynamic.forward_intermediates(tall, indices=[1], intermediates_only=True)
    assert inter[0].shape == (2, 64, 6, 4)
    assert all(layer.grid_size == (6, 4) for layer in kernel_layers(dynamic))


@pytest.mark.parametrize('window_2d', [None, 1])
def test_gka_dynamic_size_matches_a_model_built_for_it(window_2d):
    kwargs = {} if window_2d is None else {'window_2d': window_2d}
    dynamic = create('gka_deit_tiny_patch16_224', dynamic_img_size=True, **kwargs)
    built = create('gka_deit_tiny_patch16_224', img_size=(40, 24), **kwargs)
    state = {k: v for k, v in dynamic.state_dict().items() if k != 'pos_embed'}
    built.load_state_dict(state, strict=False)
    with torch.no_grad():
        built.pos_embed.copy_(timm.layers.resample_abs_pos_embed(dynamic.pos_embed, (5, 3), (4, 4),
                                                                 num_prefix_tokens=1))
        x = images(40, 24)
        torch.testing.assert_close(dynamic(x), built(x), rtol=1e-5, atol=1e-5)
    assert built.blocks[0].attn.grid_size == (5, 3) and dynamic.blocks[0].attn.grid_size == (5, 3)


def test_unknown_attention_keywords_are_refused():
    with pytest.raises(TypeError, match='does not take'):
        timm.create_model('vlt_deit_tiny_patch16_224', window_2d=1, **SMALL)
