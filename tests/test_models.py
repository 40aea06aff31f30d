"""The registry: names, parameter counts of paper Table 2, keyword pass-through and weight round trips."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from vit_gka import GaussianKernelAttention

GKA_NAMES = timm.list_models('gka_deit_*')
VLT_NAMES = timm.list_models('vlt_deit_*')
SMALL = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=2)


def count(model, key=None):
    return sum(p.numel() for n, p in model.named_parameters() if key is None or key in n)


def test_every_family_member_is_registered():
    assert set(GKA_NAMES) == {'gka_deit_tiny_patch16_224', 'gka_deit_small_patch16_224',
                              'gka_deit_base_patch16_224', 'gka_deit_base_patch16_384', 'gka_deit_fmnist_patch7_28'}
    assert set(VLT_NAMES) == {'vlt_deit_tiny_patch16_224', 'vlt_deit_small_patch16_224',
                              'vlt_deit_base_patch16_224'}


@pytest.mark.parametrize('name, params_m, sigmas', [
    ('gka_deit_tiny_patch16_224', 4.38, 36),
    ('gka_deit_small_patch16_224', 16.73, 72),
    ('gka_deit_base_patch16_224', 65.31, 144),
    ('vlt_deit_tiny_patch16_224', 5.28, 0),
    ('deit_tiny_patch16_224', 5.72, 0),
])
def test_parameter_counts_match_paper_table_2(name, params_m, sigmas):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert round(count(model) / 1e6, 2) == params_m
    assert count(model, 'log_sigma') == sigmas


@pytest.mark.parametrize('name', GKA_NAMES + VLT_NAMES)
def test_create_forward_backward_small(name):
    model = timm.create_model(name, **SMALL)
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_keywords_pass_through():
    model = timm.create_model('gka_deit_tiny_patch16_224', impl='reference', window_2d=2, sigma_init=1.5,
                              drop_path_rate=0.1, embed_dim=64, num_heads=4, **SMALL)
    attn = model.blocks[0].attn
    assert isinstance(attn, GaussianKernelAttention)
    assert (attn.impl, attn.window_2d, attn.grid_size, attn.num_prefix_tokens) == ('reference', 2, (7, 7), 1)
    assert torch.allclose(attn.sigma, torch.full((4,), 1.5))
    assert model.embed_dim == 64 and len(model.blocks) == 2
    with pytest.raises(TypeError, match='does not take'):
        timm.create_model('vlt_deit_tiny_patch16_224', sigma_init=1.0)


def test_impls_agree_inside_a_model():
    torch.manual_seed(0)
    ref = timm.create_model('gka_deit_tiny_patch16_224', impl='reference', **SMALL).eval()
    fused = timm.create_model('gka_deit_tiny_patch16_224', **SMALL).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match='no published weights'):
        timm.create_model('gka_deit_tiny_patch16_224', pretrained=True)


@pytest.mark.parametrize('name', ['gka_deit_tiny_patch16_224', 'vlt_deit_tiny_patch16_224'])
def test_safetensors_round_trip_through_timm(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # nothing left at its initial value
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    x = torch.randn(2, 1, 28, 28)
    small = {k: v for k, v in SMALL.items() if k != 'num_classes'}
    loaded = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **small).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    strict = timm.create_model(name, checkpoint_path=str(path), **SMALL).eval()
    torch.testing.assert_close(strict(x), model(x), rtol=0, atol=0)


def test_save_for_hf_rebuilds_from_folder_alone(tmp_path):
    model = timm.create_model('gka_deit_tiny_patch16_224', window_2d=1, sigma_init=1.2, **SMALL).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'hf'))
    loaded = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert loaded.blocks[0].attn.window_2d == 1 and len(loaded.blocks) == 2
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
