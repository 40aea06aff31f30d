"""In-memory data sets transformed a batch at a time (vit_gka/data/batched.py): the same images as timm's
per-sample PIL path for the same seeds (crops, flips, filters, resizes, centre crops, channels), the loaders that
choose between the two, and the errors of ``batch_augment=true``."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR10

from vit_gka.data.batched import BatchTransform, InMemoryImages, in_memory_arrays
from vit_gka.data.datasets import Transformed, build_transform, create_dataset
from vit_gka.data.loaders import TrainLoaderSettings, batched_dataset, create_eval_loader, create_train_loader
from vit_gka.data.sampling import SeededDataset, _mix, set_loader_epoch
from vit_gka.errors import UserError
from vit_gka.cli import CONF_DIR, compose_option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_data = pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                                reason='needs the Debian package dataset-fashion-mnist')
GRAY = {'input_size': (1, 28, 28), 'mean': (0.286,), 'std': (0.353,), 'crop_pct': 1.0, 'interpolation': 'bilinear'}
QUICK = OmegaConf.load(os.path.join(CONF_DIR, 'recipe', 'quick.yaml')).aug
DEIT = OmegaConf.load(os.path.join(CONF_DIR, 'recipe', 'deit.yaml')).aug


def aug(**kw):
    return OmegaConf.merge(DEIT, QUICK, kw)


def data_cfg(tmp_path, **kw):
    cfg = compose_option('data', 'fashion_mnist')
    return OmegaConf.merge(cfg, {'cache_dir': str(tmp_path), **kw})


def fake_cifar(n=48, size=(32, 30), seed=0):
    """A CIFAR10 object holding random RGB images (the class only reads its arrays here)."""
    ds = object.__new__(CIFAR10)
    rng = np.random.default_rng(seed)
    ds.data = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    ds.targets = list(rng.integers(0, 10, n))
    ds.classes = [str(i) for i in range(10)]
    ds.transform = ds.target_transform = None
    return ds


@pytest.fixture(scope='module')
def fmnist(tmp_path_factory):
    return create_dataset(data_cfg(tmp_path_factory.mktemp('cache')), 'train')[0]


def per_sample(dataset, transform, seeds):
    """The per-sample path (timm's PIL transform under sampling.SeededDataset's per-sample seeds)."""
    ds = SeededDataset(Transformed(dataset, transform))
    return torch.stack([ds[(i, s) if s is not None else i][0] for i, s in enumerate(seeds)])


CASES = {  # name: (data config changes, training aug (None: evaluation transform))
    'quick recipe': ({}, aug()),
    'bicubic, DeiT scales, vertical flips': ({}, aug(interpolation='bicubic', scale=[0.08, 1.0],
                                                     ratio=[0.75, 1.3333], vflip=0.5)),
    'random filter': ({}, aug(interpolation='random', scale=[0.08, 1.0])),
    'upscaled to 64': ({'input_size': (1, 64, 64)}, aug(scale=[0.08, 1.0])),
    'repeated to RGB': ({'input_size': (3, 28, 28), 'mean': (0.2, 0.3, 0.4), 'std': (0.3,) * 3}, aug()),
    'evaluation': ({}, None),
    'evaluation, shrunk to 20 with a centre crop': ({'input_size': (1, 20, 20), 'crop_pct': 0.875}, None),
    'evaluation, bicubic to 72': ({'input_size': (1, 72, 72), 'crop_pct': 0.9, 'interpolation': 'bicubic'}, None),
}


@needs_data
@pytest.mark.parametrize('case', list(CASES))
def test_batches_equal_the_per_sample_path_on_fashion_mnist(fmnist, case):
    changes, train_aug = CASES[case]
    data_config = {**GRAY, **changes}
    transform = build_transform(data_config, train_aug is not None, train_aug)
    batched = batched_dataset(fmnist, transform, True)
    assert isinstance(batched, InMemoryImages)
    seeds = [_mix(11, p) for p in range(40)] if train_aug is not None else [None] * 40
    items = list(zip(range(40), seeds)) if train_aug is not None else list(range(40))
    images, targets = batched.__getitems__(items)
    expect = per_sample(fmnist, transform, seeds)
    assert images.shape == expect.shape and images.dtype == torch.float32
    assert torch.equal(images, expect), (images - expect).abs().max()
    assert torch.equal(targets, fmnist.targets[:40])


@pytest.mark.parametrize('train', [True, False])
def test_batches_equal_the_per_sample_path_on_rgb_images(train):
    ds = fake_cifar()
    data_config = {'input_size': (3, 32, 32), 'mean': (0.5, 0.4, 0.3), 'std': (0.2, 0.25, 0.3),
                   'crop_pct': 0.9, 'interpolation': 'bicubic'}
    transform = build_transform(data_config, train, aug(scale=[0.08, 1.0]) if train else None)
    batched = batched_dataset(ds, transform, True)
    seeds = [_mix(5, p) for p in range(len(ds))] if train else [None] * len(ds)
    images, _ = batched.__getitems__(list(zip(range(len(ds)), seeds)) if train else list(range(len(ds))))
    assert torch.equal(images, per_sample(ds, transform, seeds))


def test_a_sample_does_not_depend_on_its_batch():
    ds = fake_cifar(size=(32, 32))
    transform = build_transform({'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
                                 'interpolation': 'bilinear', 'crop_pct': 1.0}, True, aug(scale=[0.08, 1.0]))
    batched = batched_dataset(ds, transform)
    items = [(i, _mix(3, i)) for i in range(len(ds))]
    whole, _ = batched.__getitems__(items)
    halves = torch.cat([batched.__getitems__(items[:17])[0], batched.__getitems__(items[17:])[0]])
    single = batched[items[5]][0]
    assert torch.equal(whole, halves) and torch.equal(whole[5], single)
    assert not torch.equal(whole, batched.__getitems__([(i, _mix(4, i)) for i in range(len(ds))])[0])


@needs_data
def test_train_loader_batches_equal_per_sample_loader_batches(fmnist):
    loaders = [create_train_loader(fmnist, GRAY, TrainLoaderSettings(32, aug(), subset=96, seed=7, batch_augment=mode))
               for mode in (True, False)]
    assert isinstance(loaders[0].dataset, InMemoryImages) and isinstance(loaders[1].dataset, SeededDataset)
    assert loaders[0].num_workers == 0  # workers=0 given; auto on the CPU is 0 too (test_data.py)
    for epoch in (0, 1):
        batches = []
        for loader in loaders:
            set_loader_epoch(loader, epoch)
            batches.append(list(loader))
        assert len(batches[0]) == 3
        for (x, y), (x2, y2) in zip(*batches):
            assert torch.equal(x, x2) and torch.equal(y, y2)


@needs_data
def test_eval_loader_is_batched_and_equals_the_per_sample_one(tmp_path):
    cfg = data_cfg(tmp_path, eval_subset=50)
    batched, classes = create_eval_loader(cfg, GRAY, 32)
    plain, _ = create_eval_loader(cfg, GRAY, 32, batch_augment=False)
    assert classes == 10 and isinstance(batched.dataset, InMemoryImages) and len(batched.dataset) == 50
    for (x, y), (x2, y2) in zip(batched, plain):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_auto_workers_are_zero_for_batched_data_on_the_cpu_only():
    ds = fake_cifar(size=(32, 32))
    data_config = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
                   'crop_pct': 1.0}
    assert create_train_loader(ds, data_config, TrainLoaderSettings(8, aug(), num_workers='auto')).num_workers == 0
    if len(os.sched_getaffinity(0)) > 1:  # off the CPU the workers transform whole batches
        settings = TrainLoaderSettings(8, aug(), num_workers='auto', on_cpu=False)
        assert create_train_loader(ds, data_config, settings).num_workers >= 1


def test_steps_that_cannot_be_batched_fall_back_or_stop():
    ds = fake_cifar(size=(32, 32))
    data_config = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bicubic',
                   'crop_pct': 0.875}
    deit = build_transform(data_config, True, DEIT)  # RandAugment, colour jitter, random erasing
    assert batched_dataset(ds, deit, 'auto') is None
    assert isinstance(create_train_loader(ds, data_config, TrainLoaderSettings(8, DEIT)).dataset, SeededDataset)
    with pytest.raises(UserError, match='batch_augment=true cannot apply RandAugment'):
        batched_dataset(ds, deit, True)
    gray = build_transform({**data_config, 'input_size': (1, 32, 32), 'mean': (0.5,), 'std': (0.5,)}, False)
    assert BatchTransform.of(gray, (32, 32), 3) == (None, 'RGB to grayscale conversion')
    with pytest.raises(UserError, match='batch_augment must be auto, true or false'):
        batched_dataset(ds, deit, 'yes')
    assert in_memory_arrays(Transformed(ds, deit)) is None
    with pytest.raises(UserError, match='needs a data set held in memory'):
        batched_dataset(Transformed(ds, deit), deit, True)
