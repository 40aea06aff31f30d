"""GKA wherever timm has a VisionTransformer (``attn_layer='gka'`` or the class: vit_*, deit3_*, deit_*), and hybrids
(``gka_blocks``: GKA in some blocks, dot-product attention in the others); parameters and FLOPs follow; both train
from the command line and reload from their model/ folders."""
import json

import pytest
import timm
import torch

from helpers import TINY, check, needs_data, one_line_error, run
from vit_gka import GaussianKernelAttention
from vit_gka.measure.flops import model_stats

SMALL = dict(img_size=32, patch_size=8, depth=4, num_classes=5)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'deit3_small_patch16_224', 'vit_base_patch32_224',
                                  'deit_tiny_patch16_224'])
@pytest.mark.parametrize('layer', ['gka', GaussianKernelAttention])
def test_any_timm_vit_takes_gka(name, layer):
    kwargs = dict(SMALL, patch_size=16 if 'patch16' in name else 32, img_size=64)
    model = timm.create_model(name, attn_layer=layer, **kwargs).eval()
    plain = timm.create_model(name, **kwargs)
    assert all(isinstance(b.attn, GaussianKernelAttention) for b in model.blocks)
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    qkv = 3 * dim * dim + 3 * dim * (plain.blocks[0].attn.qkv.bias is not None)
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in model.parameters()) == \
        len(model.blocks) * (qkv - heads) + sum(p.numel() for b in plain.blocks for n, p in b.attn.named_parameters()
                                                if 'norm' in n)  # no q / k / v (nor their norms), one sigma a head
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_hybrid_blocks_parameters_and_flops():
    gka = timm.create_model('gka_deit_tiny_patch16_224', **SMALL)
    hybrid = timm.create_model('gka_deit_tiny_patch16_224', gka_blocks=[0, 1], **SMALL)
    deit = timm.create_model('deit_tiny_patch16_224', **SMALL)
    assert [type(b.attn).__name__ for b in hybrid.blocks] == ['GaussianKernelAttention'] * 2 + ['Attention'] * 2
    count = [sum(p.numel() for p in m.parameters()) for m in (gka, hybrid, deit)]
    assert count[1] * 2 == count[0] + count[2]  # half the blocks each way
    macs = [model_stats(m, img_size=32, in_chans=3)['gmacs'] for m in (gka, hybrid, deit)]
    assert macs[0] < macs[1] < macs[2]
    with pytest.raises(ValueError, match='gka_blocks=\\[7\\]: block indices must be in 0 .. 3'):
        timm.create_model('gka_deit_tiny_patch16_224', gka_blocks=[7], **SMALL)


@needs_data
def test_hybrid_and_timm_vit_train_and_reload(tmp_path):
    hybrid, vit = tmp_path / 'hybrid', tmp_path / 'vit'
    check(run(['epochs=1', *TINY, '+model.args.gka_blocks=[1]', f'hydra.run.dir={hybrid}'], cwd=tmp_path))
    check(run(['epochs=1', *[a for a in TINY if not a.startswith('model.args')], 'model=timm',
               'model.name=deit3_small_patch16_224', '+model.args.attn_layer=gka', '+model.args.img_size=28',
               '+model.args.patch_size=7', '+model.args.depth=2', f'hydra.run.dir={vit}'], cwd=tmp_path))
    for run_dir, kinds in ((hybrid, ['Attention', 'GaussianKernelAttention']),
                           (vit, ['GaussianKernelAttention', 'GaussianKernelAttention'])):
        model = timm.create_model(f'local-dir:{run_dir}/model', pretrained=True)
        assert [type(b.attn).__name__ for b in model.blocks] == kinds
        assert json.loads((run_dir / 'results.json').read_text())['params'] == sum(p.numel() for p in model.parameters())
    one_line_error(run(['+model.args.gka_blocks=[9]', f'hydra.run.dir={tmp_path}/a'], cwd=tmp_path),
                   'block indices must be in 0 .. 5')
    one_line_error(run(['model=timm', 'model.name=deit3_small_patch16_224', '+model.args.attn_layer=nope',
                        f'hydra.run.dir={tmp_path}/b'], cwd=tmp_path), "model.args.attn_layer=nope is not one of")
