"""FLOP and parameter accounting (vit_gka/measure/flops.py) against published numbers, an analytic formula and
torch's FlopCounterMode; its command line (python -m vit_gka.measure.flops, the vit-gka-flops command)."""
import functools
import json

import pytest
import timm
import torch
from timm.models import model_entrypoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit_gka.measure import flops as flops_cli
from vit_gka.measure.flops import count_impl, model_stats

from helpers import ROOT, python

SHAPES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
DEIT_GMACS = {'tiny': 1.26, 'small': 4.61, 'base': 17.58}  # timm / DeiT paper
GKA_GFLOPS = {'tiny': 1.98, 'small': 7.11, 'base': 26.76}  # GKA paper, Table 2 (2 x MACs)


def fast_model(name, **kwargs):
    """The model with uninitialised (zeroed) weights: shapes are all counting needs, and it skips
    the seconds timm's weight init takes for DeiT-B."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    model = model.to_empty(device='cpu')
    for p in model.parameters():
        p.data.zero_()
    return model


@functools.lru_cache(maxsize=None)
def stats_of(name):
    return model_stats(fast_model(name))


def analytic_macs(dim, depth=12, img=224, patch=16, in_chans=3, classes=1000, qk_v_proj=3):
    """MACs of a DeiT-shaped ViT for one image, written out. ``qk_v_proj``: input projections of width D
    per attention (3 = W_Q, W_K, W_V; 2 = VLT, no W_V; 0 = GKA). fvcore counts LayerNorm as 5 per element."""
    patches = (img // patch) ** 2
    n = patches + 1
    layer_norm = 5 * n * dim
    block = (2 * layer_norm
             + qk_v_proj * n * dim * dim   # input projections
             + 2 * n * n * dim             # scores (q.k or the kernel's x_i.x_j) + weighted sum of values
             + n * dim * dim               # output projection W_O
             + 2 * n * dim * 4 * dim)      # MLP, ratio 4
    return patches * in_chans * patch * patch * dim + depth * block + layer_norm + dim * classes


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_published_and_analytic(size):
    dim, heads = SHAPES[size]
    deit, gka, vlt = (stats_of(f'{kind}deit_{size}_patch16_224') for kind in ('', 'gka_', 'vlt_'))
    assert deit['gmacs'] == pytest.approx(DEIT_GMACS[size], rel=0.01)
    assert gka['gflops'] == pytest.approx(GKA_GFLOPS[size], rel=0.015)
    assert gka['gflops'] == pytest.approx(2 * gka['gmacs'])
    for stats, proj in ((deit, 3), (vlt, 2), (gka, 0)):
        assert stats['gmacs'] * 1e9 == pytest.approx(analytic_macs(dim, qk_v_proj=proj), rel=1e-9)
        assert stats['unsupported'] == []
        assert stats['gelementwise'] < 0.01 * stats['gmacs']
    # parameter breakdown (paper Table 2): GKA keeps only W_O and one log-sigma per head in attention
    assert gka['params_attn'] == 12 * (dim * dim + dim + heads)
    assert deit['params_mlp'] == gka['params_mlp'] == 12 * (8 * dim * dim + 5 * dim)
    assert deit['params'] == deit['params_attn'] + deit['params_mlp'] + deit['params_other']
    assert gka['size_mb'] == pytest.approx(gka['params'] * 4 / 2 ** 20)


def test_vlt_tiny_paper():
    stats = stats_of('vlt_deit_tiny_patch16_224')
    assert stats['params'] / 1e6 == pytest.approx(5.28, abs=0.005)
    assert stats['gflops'] == pytest.approx(2.33, rel=0.015)  # paper Table 5


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'gka_deit_tiny_patch16_224', 'vlt_deit_tiny_patch16_224',
                                  'gka_deit_small_patch16_224'])
def test_flop_counter_mode_agrees(name):
    model = fast_model(name).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), count_impl(model), counter:
        model(torch.randn(1, 3, 224, 224))
    torch_macs = counter.get_total_flops() / 2  # torch counts 2 per multiply-accumulate
    assert model_stats(model)['gmacs'] * 1e9 == pytest.approx(torch_macs, rel=0.01)


def test_padding_is_not_counted():
    """sdpa_pad (width 72 for d = 64) and the materialised reference count the same as sdpa_bias."""
    base = stats_of('gka_deit_tiny_patch16_224')['gmacs']
    for impl in ('sdpa_pad', 'reference'):
        model = fast_model('gka_deit_tiny_patch16_224', impl=impl)
        assert model_stats(model)['gmacs'] == pytest.approx(base, rel=1e-9)
        assert all(m.impl == impl for m in model.modules() if hasattr(m, 'log_sigma'))  # restored


def test_every_registered_model_is_fully_counted():
    names = [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('vit_gka')]
    assert any(n.startswith('gka_') for n in names) and any(n.startswith('vlt_') for n in names)
    for name in names:  # two blocks at 64 x 64 reach every op the full model does
        stats = model_stats(fast_model(name, img_size=64, depth=2))
        assert stats['unsupported'] == [], name
        assert stats['gmacs'] > 0 and stats['params'] == stats['params_attn'] + stats['params_mlp'] + stats['params_other']
    masked = model_stats(fast_model('gka_deit_tiny_patch16_224', img_size=64, depth=2, window_2d=1))
    assert masked['unsupported'] == []


def run_cli(*args):
    return python(['-m', 'vit_gka.measure.flops', *args], ROOT)


def test_cli_json(capsys):
    assert flops_cli.main(['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224', '--img-size', '32', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['model'] for r in rows] == ['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224']
    assert {'model', 'params', 'params_attn', 'params_mlp', 'gmacs', 'gflops'} <= set(rows[0])
    assert rows[0]['img_size'] == [32, 32] and rows[0]['gflops'] == pytest.approx(2 * rows[0]['gmacs'])


def test_cli_unknown_model_and_bad_size_exit_2_in_one_line():
    for args, message in ((['no_such_model'], "unknown model 'no_such_model'"),
                          (['deit_tiny_patch16_224', '--img-size', '0'], '--img-size: needs a positive integer')):
        bad = run_cli(*args)
        assert bad.returncode == 2 and bad.stdout == '', args
        assert bad.stderr.startswith('error: ') and message in bad.stderr and bad.stderr.count('\n') == 1, bad.stderr


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        flops_cli.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: python -m vit_gka.measure.flops') and '--img-size N' in out and '--json' in out


def test_cli_markdown_in_process(capsys):
    assert flops_cli.main(['gka_deit_tiny_patch16_224']) == 0
    table = capsys.readouterr().out
    assert 'GMACs' in table and 'GFLOPs (2 x MACs)' in table and 'size (MiB, fp32)' in table
    assert '| gka_deit_tiny_patch16_224 |' in table and '1.99' in table and '4.38' in table
    assert flops_cli.main([]) == 2 and flops_cli.main(['deit_tiny_patch16_224', '--img-size', 'x']) == 2
    assert flops_cli.main(['deit_tiny_patch16_224', '--bogus']) == 2
