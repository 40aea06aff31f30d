"""The shipped pretrained GKA: ``timm.create_model('gka_deit_fmnist_patch7_28', pretrained=True)`` loads the weights
in the package, offline, and eval.py on them scores the top-1 the README states."""
import json
import os
import re

import pytest
import timm
import torch
from safetensors import safe_open

import vit_gka  # noqa: F401  (registers the models)
from helpers import ROOT, check, script
from vit_gka.models.gka_deit import FMNIST_LABELS, FMNIST_TOP1, FMNIST_WEIGHTS

NAME = 'gka_deit_fmnist_patch7_28'
needs_data = pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                                reason='needs the Debian package dataset-fashion-mnist')


def test_loads_by_name_from_the_package_with_its_preprocessing():
    assert os.path.getsize(FMNIST_WEIGHTS) < 5e6
    with safe_open(FMNIST_WEIGHTS, 'pt') as f:  # timm's key names, no wrapper prefix
        keys = set(f.keys())
    assert {'cls_token', 'pos_embed', 'blocks.0.attn.log_sigma', 'head.weight'} <= keys
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in keys)
    model = timm.create_model(f'{NAME}.vitgka_fmnist', pretrained=True).eval()
    default = timm.create_model(NAME, pretrained=True)  # the default tag is the shipped one
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), default.state_dict().values()))
    cfg = model.pretrained_cfg
    assert cfg['file'] == FMNIST_WEIGHTS and cfg['input_size'] == (1, 28, 28) and cfg['num_classes'] == 10
    assert tuple(cfg['label_names']) == FMNIST_LABELS and cfg['mean'] == (0.2860,)
    data = timm.data.resolve_data_config({}, model=model)
    assert data['input_size'] == (1, 28, 28) and data['crop_pct'] == 1.0
    fresh = timm.create_model(NAME)  # pretrained=False: the same architecture, other weights
    assert not torch.equal(fresh.head.weight, model.head.weight)


@needs_data
def test_eval_py_reproduces_the_stated_top1(tmp_path):
    """eval.py model_name=<name>: the Fashion-MNIST test set (10,000 images), eager float32 on the CPU. The README
    states FMNIST_TOP1; another CPU's kernels may round a borderline logit the other way, hence 0.05 points
    (5 images) of tolerance."""
    check(script('eval.py', [f'model_name={NAME}', 'workers=0', f'out={tmp_path}', f'hydra.run.dir={tmp_path}/hydra'],
                 cwd=ROOT, timeout=600))
    out = json.loads((tmp_path / 'eval.json').read_text())
    assert out['num_images'] == 10000 and out['data'] == 'fashion_mnist'
    assert out['top1'] == pytest.approx(FMNIST_TOP1, abs=0.05) and FMNIST_TOP1 >= 91.0
    assert out['weights'].startswith(f'{NAME}.vitgka_fmnist (')
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert re.search(rf'{NAME}.*{FMNIST_TOP1:.2f}', readme, re.S)
