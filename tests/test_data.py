"""Data sets and loaders: Fashion-MNIST from the Debian package or a data.root of .gz files, channel handling, the
DeiT augmentation on 1-channel images, ImageFolder data sets, the eval-loader contract, and the seeded sampler."""
import os
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vit_gka.errors import UserError
from vit_gka.data.datasets import FMNIST_FILES, class_names, create_dataset, patch_randaugment_posterize
from vit_gka.data.loaders import (MAX_AUTO_WORKERS, TrainLoaderSettings, create_eval_loader, create_train_loader,
                                  loader_workers)
from vit_gka.data.sampling import SeededSampler, set_loader_epoch, train_sampler
from vit_gka.cli import CONF_DIR, compose_option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_FMNIST = os.path.isdir('/usr/share/datasets/fashion-mnist')
needs_data = pytest.mark.skipif(not HAS_FMNIST, reason='needs the Debian package dataset-fashion-mnist')

GRAY = {'input_size': (1, 28, 28), 'mean': (0.286,), 'std': (0.353,), 'crop_pct': 1.0, 'interpolation': 'bilinear'}
RGB32 = {'input_size': (3, 32, 32), 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'crop_pct': 0.875,
         'interpolation': 'bicubic'}


def data_cfg(config, **kw):
    cfg = compose_option('data', config)
    cfg.cache_dir = kw.pop('cache_dir', cfg.get('cache_dir'))
    return OmegaConf.merge(cfg, kw)


@needs_data
def test_fashion_mnist_eval_loader(tmp_path):
    loader, num_classes = create_eval_loader(data_cfg('fashion_mnist', cache_dir=str(tmp_path), eval_subset=64),
                                             GRAY, batch_size=32)
    assert num_classes == 10 and len(loader.dataset) == 64
    assert os.path.isfile(tmp_path / 'fashion_mnist' / 'FashionMNIST' / 'raw' / 't10k-images-idx3-ubyte')
    images, labels = next(iter(loader))
    assert images.shape == (32, 1, 28, 28) and labels.dtype == torch.int64
    full, _ = create_eval_loader(data_cfg('fashion_mnist', cache_dir=str(tmp_path)), RGB32, batch_size=16)
    assert len(full.dataset) == 10000
    assert next(iter(full))[0].shape == (16, 3, 32, 32)  # grayscale repeated to RGB for a 3-channel model


@needs_data
def test_deit_augmentation_on_grayscale(tmp_path):
    recipe = OmegaConf.load(os.path.join(CONF_DIR, 'recipe', 'deit.yaml'))
    dataset, num_classes = create_dataset(data_cfg('fashion_mnist', cache_dir=str(tmp_path)), 'train')
    assert num_classes == 10 and class_names(dataset)[:2] == ['T-shirt/top', 'Trouser']
    loader = create_train_loader(dataset, GRAY, TrainLoaderSettings(16, recipe.aug, subset=64, seed=3))
    set_loader_epoch(loader, 0)
    a = [y for _, y in loader]
    set_loader_epoch(loader, 0)
    b = [y for _, y in loader]
    set_loader_epoch(loader, 1)
    c = [y for _, y in loader]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the order is a function of (seed, epoch)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    images, _ = next(iter(loader))
    assert images.shape == (16, 1, 28, 28) and torch.isfinite(images).all()


def test_image_folder(tmp_path):
    for split in ('train', 'val'):
        for cls in ('cat', 'dog', 'fox'):
            os.makedirs(tmp_path / split / cls)
            for i in range(2):
                Image.new('RGB', (40, 36), (i * 90, 30, 200)).save(tmp_path / split / cls / f'{i}.png')
    loader, num_classes = create_eval_loader(data_cfg('folder', root=str(tmp_path)), RGB32, batch_size=4)
    assert num_classes == 3 and len(loader.dataset) == 6
    assert next(iter(loader))[0].shape == (4, 3, 32, 32)
    with pytest.raises(UserError, match='does not exist'):
        create_eval_loader(data_cfg('imagenet', root=str(tmp_path / 'missing')), RGB32, batch_size=4)
    with pytest.raises(UserError, match='not set'):
        create_eval_loader(data_cfg('imagenet'), RGB32, batch_size=4)


def test_randaugment_posterize_at_full_magnitude():
    """DeiT's RandAugment reaches 0-bit posterize; recent Pillow raises there unless patched."""
    from timm.data.auto_augment import AugmentOp
    patch_randaugment_posterize()
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    for mode in ('L', 'RGB'):
        out = op(Image.new(mode, (28, 28), 200))
        assert out.mode == mode and out.getextrema() in ((0, 0), ((0, 0),) * 3)


@needs_data
def test_fashion_mnist_root_with_only_gz_files(tmp_path):
    """<root>/FashionMNIST/raw/ holding only the .gz files: decompressed into the cache (torchvision reads the
    decompressed files only), the root itself left as it was."""
    raw = tmp_path / 'data' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in FMNIST_FILES:
        shutil.copy(os.path.join('/usr/share/datasets/fashion-mnist', name + '.gz'), raw)
    before = sorted(os.listdir(raw))
    cfg = data_cfg('fashion_mnist', root=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'), download=False)
    loader, num_classes = create_eval_loader(cfg, GRAY, batch_size=32)
    assert num_classes == 10 and len(loader.dataset) == 10000
    assert next(iter(loader))[0].shape == (32, 1, 28, 28)
    assert os.path.isfile(tmp_path / 'cache' / 'fashion_mnist' / 'FashionMNIST' / 'raw' / 't10k-images-idx3-ubyte')
    assert sorted(os.listdir(raw)) == before
    dataset, _ = create_dataset(cfg, 'train')
    assert len(dataset) == 60000


def test_repeat_aug_sampler_is_recognised_by_type():
    """SeededSampler seeds timm's RepeatAugSampler (which shuffles by the epoch alone) with (seed, epoch), also a
    subclass of it: recognised with isinstance, not by its class name."""
    from timm.data.distributed_sampler import RepeatAugSampler

    class Subclass(RepeatAugSampler):
        """A user's own RepeatAugSampler."""

    data = list(range(12))
    sampler = train_sampler(data, seed=5, num_replicas=2, rank=0, repeated_aug=3)
    assert isinstance(sampler.sampler, RepeatAugSampler)
    for inner in (sampler.sampler, Subclass(data, num_replicas=2, rank=0, num_repeats=3)):
        seeded = SeededSampler(inner, seed=5, rank=0, num_replicas=2)
        seeded.set_epoch(2)
        assert inner.epoch == 5 * 100003 + 2
        assert [i for i, _ in seeded] == list(inner)


@pytest.mark.parametrize('cpus, local_processes, expect', [
    (2, 1, 1),          # the 2-core laptop: one worker, one core for the training loop
    (16, 1, 10),        # one GPU on a 16-core machine: DeiT's 10
    (96, 8, 10),        # 8 GPUs on 96 cores: 12 each, at most 10
    (32, 8, 3),         # 8 GPUs on 32 cores: 4 each
    (1, 1, 0),          # a single CPU: load in the training process
])
def test_auto_workers_follow_the_cpus_of_each_process(monkeypatch, cpus, local_processes, expect):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)), raising=False)
    assert loader_workers('auto', local_processes) == expect <= MAX_AUTO_WORKERS
    assert loader_workers(3, local_processes) == 3 and loader_workers('0') == 0


def test_loader_workers_persist_across_epochs():
    from vit_gka.data.loaders import _worker_kwargs
    assert _worker_kwargs(2)['persistent_workers'] is True and _worker_kwargs(0)['persistent_workers'] is False


@needs_data
def test_timm_named_torchvision_data_set(tmp_path):
    # data=timm data.name=torch/<name>: timm's create_dataset opens torchvision's class, here offline
    from vit_gka.data.datasets import fashion_mnist_root
    root, _ = fashion_mnist_root(data_cfg('fashion_mnist', cache_dir=str(tmp_path)))
    cfg = data_cfg('timm', name='torch/fashion_mnist', root=root, in_chans=1)
    train, num_classes = create_dataset(cfg, 'train')
    test, _ = create_dataset(cfg, 'eval')
    assert (len(train), len(test), num_classes) == (60000, 10000, 10)
    assert class_names(train)[:2] == ['T-shirt/top', 'Trouser']
    loader, _ = create_eval_loader(OmegaConf.merge(cfg, {'eval_subset': 8}), GRAY, batch_size=8)
    assert next(iter(loader))[0].shape == (8, 1, 28, 28)


def _tar_shards(folder, classes=('cat', 'dog'), per_class=4):
    """<folder>/train.tar and <folder>/validation.tar, each of class folders of small PNGs."""
    import tarfile
    for split in ('train', 'validation'):
        with tarfile.open(folder / f'{split}.tar', 'w') as tar:
            for c, name in enumerate(classes):
                for i in range(per_class):
                    path = folder / f'{split}_{name}_{i}.png'
                    Image.new('RGB', (40, 30), (60 * c, 10 * i, 100)).save(path)
                    tar.add(path, arcname=f'{name}/{i}.png')
    return folder


def test_timm_tar_shards_and_one_line_refusals(tmp_path):
    cfg = data_cfg('timm', name='tar', root=str(_tar_shards(tmp_path)))
    train, num_classes = create_dataset(cfg, 'train')
    assert len(train) == 8 and num_classes == 2 and class_names(train) == ['cat', 'dog']
    loader, _ = create_eval_loader(cfg, RGB32, batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and sorted(set(labels.tolist())) == [0]
    for kw, message in [(dict(name='tfds/imagenet'), 'the streaming readers hfids/, tfds/ are not supported'),
                        (dict(name='tar', root=str(tmp_path / 'none')), 'none/train.tar is not a file'),
                        (dict(name='torch/nope', root=str(tmp_path)), 'data.name=torch/nope (timm.data.create_dataset'),
                        (dict(name='nope'), "unknown data set 'nope'")]:
        with pytest.raises(UserError, match=re.escape(message)) as e:
            create_dataset(data_cfg('timm', **kw), 'train')
        assert '\n' not in str(e.value)


def test_train_py_on_timm_tar_shards(tmp_path):
    from helpers import check, run
    shards = _tar_shards(tmp_path)
    run_dir = tmp_path / 'run'
    check(run(['data=timm', 'data.name=tar', f'data.root={shards}', 'epochs=1', 'batch_size=4', 'workers=0',
               'progress=false', 'model.args.depth=1', f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    import json
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['data'] == 'tar' and results['num_classes'] == 2 and results['epochs_done'] == 1
    assert json.loads((run_dir / 'model' / 'config.json').read_text())['label_names'] == ['cat', 'dog']
