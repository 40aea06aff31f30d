"""Settings that only timm or torch would catch, or that train silently wrong: one line before the run folder is
written. The value checks run in-process on the composed configuration (what train.py runs before Hydra); the
checks that need the model or the data run train.py on real data, against an existing run folder that must stay
as it was."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from helpers import ROOT, TINY, check, digest, needs_data, one_line_error, run
from vit_gka.errors import UserError
from vit_gka.train.validation import validate
from vit_gka.cli import CONF_DIR




@pytest.fixture(scope='module')
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base='1.3'):
        yield


def composed(*overrides):
    cfg = compose('config', overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize('override, message', [
    ('lr=inf', 'lr must be a finite number, got inf'),
    ('aug.mixup=nan', 'aug.mixup must be a finite number, got nan'),
    ('optim.weight_decay=-inf', 'optim.weight_decay must be a finite number'),
    ('drop_path=2', 'drop_path must be a number in [0, 1)'),
    ('aug.smoothing=1.5', 'aug.smoothing must be a number in [0, 1)'),
    ('ema.decay=1.5', 'ema.decay must be a number in [0, 1]'),
    ('data.eval_subset=0', 'data.eval_subset must be an integer >= 1'),
    ('data.eval_subset=-5', 'data.eval_subset must be an integer >= 1'),
    ('model.args.img_size=0', 'model.args.img_size must be a positive number of pixels'),
    ('optim.opt=nosuch', "timm cannot create optimizer 'nosuch'"),
    ('sched.sched=nosuch', "sched.sched='nosuch': timm has no such per-step schedule"),
])
def test_bad_values_are_one_line(hydra_conf, override, message):
    with pytest.raises(UserError, match=None) as error:
        validate(composed(override))
    assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 is refused on the CPU only')
def test_fp16_on_the_cpu_is_refused(hydra_conf):
    with pytest.raises(UserError, match='mixed_precision=fp16 needs a CUDA GPU'):
        validate(composed('mixed_precision=fp16'))


def test_the_defaults_and_the_deit_recipe_pass(hydra_conf):
    validate(composed())
    validate(composed('recipe=deit', 'model=gka', 'shape=small', 'data=imagenet'))


@pytest.fixture(scope='module')
def existing(tmp_path_factory):
    """A finished run to aim the bad runs at: none of them may change it."""
    folder = tmp_path_factory.mktemp('faults_config') / 'run'
    check(run(['epochs=1', *TINY, 'train_subset=32', 'data.eval_subset=32', 'model.args.depth=1',
               f'hydra.run.dir={folder}'], cwd=ROOT))
    return folder


def _folder(root, train_classes, val_classes):
    """An ImageFolder pair of tiny real PNGs (Fashion-MNIST-sized gray squares)."""
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new('L', (28, 28), color=40 * i + 10 * len(c)).save(root / split / c / f'{i}.png')
    return root


@needs_data
@pytest.mark.parametrize('args, message', [
    (['lr=inf'], 'lr must be a finite number'),
    (['model.args.img_size=30'], 'model.args.img_size=30 is not a multiple of the patch size 7: the last 2 rows and '
                                 'columns would be dropped; give model.args.img_size=28 or 35'),
    (['model.args.img_size=5'], 'model.args.img_size=5 is smaller than one patch (7 pixels)'),
    (['model=timm', 'model.name=resnet18'], 'resnet18 is not a vision transformer'),
    (['data=folder', 'data.root={data}/missing', 'data.in_chans=1'], 'only in training (e.g. c2)'),
    (['data=folder', 'data.root={data}/extra', 'data.in_chans=1'], 'only in the test split (e.g. c9)'),
    (['data=folder', 'data.root={data}/same', 'data.in_chans=1', 'data.num_classes=2'],
     'data.num_classes=2, but data folder has 3 classes'),
])
def test_model_and_data_mistakes_are_one_line_and_change_nothing(existing, tmp_path, args, message):
    _folder(tmp_path / 'missing', ['c0', 'c1', 'c2'], ['c0', 'c1'])
    _folder(tmp_path / 'extra', ['c0', 'c1'], ['c0', 'c1', 'c9'])
    _folder(tmp_path / 'same', ['c0', 'c1', 'c2'], ['c0', 'c1', 'c2'])
    before = digest(existing)
    args = [a.format(data=tmp_path) for a in args]
    proc = run([*args, 'epochs=1', 'workers=0', 'progress=false', f'hydra.run.dir={existing}'],
               cwd=tmp_path, timeout=120)
    one_line_error(proc, message)
    assert digest(existing) == before
