"""Data sets and loaders: Fashion-MNIST (default, offline), ImageNet / any ImageFolder pair, CIFAR-10/100.

Every data set is read into a map-style dataset and transformed with timm's ``create_transform`` from
the model's data config (``timm.data.resolve_data_config``): input size, mean / std, interpolation and
crop. Grayscale sources feed 1-channel models directly and are repeated to RGB for 3-channel models.

Fashion-MNIST is looked up, in order, in the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``, decompressed once into a cache folder where torchvision's
``FashionMNIST`` expects them: ``<cache>/FashionMNIST/raw/``), then under ``data.root``, then downloaded by
torchvision (``data.download``).

The ``data`` config node (``conf/data/*.yaml``) names the data set (``name``) and where it lives; see
the yaml files for the keys.

The training order and every sample's augmentation are functions of (seed, epoch): see sampling.py.

Unreadable images in an ImageFolder (corrupt, truncated, not an image): skipped, not fatal. The next image of
the folder stands in for it, a warning names the file (once), and the number of such files (over all loader
workers) is reported per epoch and in results.json (``unreadable_images``); ``MAX_UNREADABLE_IN_A_ROW`` in a
row stop the run.
"""
import gzip
import logging
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vit_gka.errors import UserError
from vit_gka.data.sampling import SeededDataset, train_sampler

log = logging.getLogger('vit_gka.data')

__all__ = ['DATASETS', 'create_dataset', 'create_eval_loader', 'create_train_loader', 'data_preprocessing',
           'build_transform', 'fashion_mnist_root', 'unreadable_images']

DATASETS = ('fashion_mnist', 'imagenet', 'folder', 'cifar10', 'cifar100')
FMNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
MAX_UNREADABLE_IN_A_ROW = 20


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a DictConfig, a dict or None."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


def _expand(path: Optional[str]) -> Optional[str]:
    return None if path in (None, '') else os.path.abspath(os.path.expanduser(str(path)))


class ToMode:
    """Convert a PIL image to ``mode`` ('L' or 'RGB') so that its channels match the model's."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mode={self.mode!r})'


def _decompress_into(src_dir: str, raw_dir: str) -> None:
    """Decompress the four IDX .gz files of ``src_dir`` into ``raw_dir``, each atomically (tmp + rename)."""
    os.makedirs(raw_dir, exist_ok=True)
    for name in FMNIST_FILES:
        dst = os.path.join(raw_dir, name)
        if os.path.exists(dst):
            continue
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f'.{name}.')
        try:
            with gzip.open(os.path.join(src_dir, name + '.gz'), 'rb') as fin, os.fdopen(fd, 'wb') as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _has_fmnist(folder: Optional[str], suffix: str = '') -> bool:
    return folder is not None and all(os.path.isfile(os.path.join(folder, n + suffix)) for n in FMNIST_FILES)


def fashion_mnist_root(data_cfg) -> Tuple[str, bool]:
    """The ``root`` to give torchvision's ``FashionMNIST`` and whether it may download there.

    1. the Debian package files (``data.system_dir``), decompressed once into ``data.cache_dir``;
    2. ``data.root`` holding ``FashionMNIST/raw/`` (decompressed or .gz) or the four .gz files directly;
    3. ``data.root`` (or the cache folder) with ``download=True`` when ``data.download`` is set.
    """
    system_dir = _expand(_get(data_cfg, 'system_dir', '/usr/share/datasets/fashion-mnist'))
    cache_dir = _expand(_get(data_cfg, 'cache_dir', '~/.cache/vit-gka')) or _expand('~/.cache/vit-gka')
    root = _expand(_get(data_cfg, 'root'))
    if root is not None and not os.path.isdir(root):
        raise UserError(f'data.root does not exist: {_get(data_cfg, "root")}; give data.root=<an existing folder>')
    if root is None and _has_fmnist(system_dir, '.gz'):
        cache = os.path.join(cache_dir, 'fashion_mnist')
        raw = os.path.join(cache, 'FashionMNIST', 'raw')
        if not _has_fmnist(raw):
            _decompress_into(system_dir, raw)
        return cache, False
    if root is not None:
        raw = os.path.join(root, 'FashionMNIST', 'raw')
        if _has_fmnist(raw) or _has_fmnist(raw, '.gz'):
            return root, False
        if _has_fmnist(root, '.gz'):  # the four .gz files directly under data.root
            cache = os.path.join(cache_dir, 'fashion_mnist')
            target = os.path.join(cache, 'FashionMNIST', 'raw')
            if not _has_fmnist(target):
                _decompress_into(root, target)
            return cache, False
    if _get(data_cfg, 'download', False):
        return root or os.path.join(cache_dir, 'fashion_mnist'), True
    raise UserError(
        'Fashion-MNIST not found: install the Debian package dataset-fashion-mnist, or set data.root to a '
        'folder holding FashionMNIST/raw/, or set data.download=true')


class CheckedImageFolder(Dataset):
    """An ImageFolder (timm's folder reader) whose unreadable files are skipped and counted (module docstring)."""

    def __init__(self, folder: str, transform=None):
        from timm.data import create_reader
        try:
            self.reader = create_reader('', root=folder)
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
            raise UserError(f'no images found under {folder} (expected <class>/<image>.jpg|.jpeg|.png); '
                            f'point data.root at an ImageFolder tree') from e
        self.transform = transform
        # one flag per file, in shared memory: the loader's worker processes mark what they could not read
        self.unreadable = multiprocessing.RawArray('B', len(self.reader))

    def __len__(self) -> int:
        return len(self.reader)

    def _read(self, index: int):
        from PIL import Image
        file, target = self.reader[index][:2]
        try:
            with Image.open(file) as img:
                return img.convert('RGB'), target  # decodes every pixel: a truncated file fails here
        finally:
            file.close()

    def __getitem__(self, index: int):
        from PIL import Image
        for _ in range(MAX_UNREADABLE_IN_A_ROW):
            try:
                img, target = self._read(index)
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                bad = self.reader.filename(index, absolute=True)
                if not self.unreadable[index]:
                    self.unreadable[index] = 1
                    log.warning('unreadable image %s (%s): the next image stands in for it', bad,
                                ' '.join(str(e).split()))
                index = (index + 1) % len(self)
        else:
            raise UserError(f'{MAX_UNREADABLE_IN_A_ROW} unreadable images in a row, the last {bad}; check the '
                            f'files under data.root')
        return (self.transform(img) if self.transform is not None else img), target

    @property
    def classes(self):
        return list(self.reader.class_to_idx)


def unreadable_images(dataset: Dataset) -> int:
    """How many unreadable images (files) ``dataset`` (or the ImageFolder it wraps) has met so far."""
    while dataset is not None and not isinstance(dataset, CheckedImageFolder):
        dataset = getattr(dataset, 'dataset', None)
    return int(np.frombuffer(dataset.unreadable, dtype=np.uint8).sum()) if dataset is not None else 0


def _image_folder(data_cfg, split: str, transform) -> Dataset:
    root = _expand(_get(data_cfg, 'root'))
    if root is None:
        raise UserError(f'data.root is not set (data={_get(data_cfg, "name")} reads <root>/<split folder>); '
                        f'give data.root=<folder>')
    if not os.path.isdir(root):
        raise UserError(f'data.root does not exist: {_get(data_cfg, "root")}; give data.root=<an existing folder>')
    sub = _get(data_cfg, 'train_dir' if split == 'train' else 'val_dir', split)
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
        raise UserError(f'{split} folder does not exist: {folder} (data.root should hold {sub}/<class>/<images>)')
    return CheckedImageFolder(folder, transform=transform)


def _num_classes_of(ds: Dataset) -> int:
    base = ds.dataset if isinstance(ds, Subset) else ds
    if hasattr(base, 'classes'):
        return len(base.classes)
    raise ValueError(f'cannot tell the number of classes of {type(base).__name__}')


def create_dataset(data_cfg, split: str, transform=None) -> Tuple[Dataset, int]:
    """The ``split`` ('train' or 'eval') of the data set named by ``data_cfg.name`` and its class count."""
    name = _get(data_cfg, 'name', 'fashion_mnist')
    train = split == 'train'
    if name == 'fashion_mnist':
        from torchvision.datasets import FashionMNIST
        root, download = fashion_mnist_root(data_cfg)
        try:
            ds = FashionMNIST(root, train=train, transform=transform, download=download)
        except (OSError, RuntimeError) as e:
            raise UserError(f'could not read or download Fashion-MNIST under {root}: {e}; give data.root=<a folder '
                            f'holding FashionMNIST/raw/ or the four .gz files>') from e
    elif name in ('cifar10', 'cifar100'):
        from torchvision.datasets import CIFAR10, CIFAR100
        root = _expand(_get(data_cfg, 'root')) or os.path.join(
            _expand(_get(data_cfg, 'cache_dir', '~/.cache/vit-gka')), name)
        if _get(data_cfg, 'root') not in (None, '') and not os.path.isdir(root):
            raise UserError(f'data.root does not exist: {_get(data_cfg, "root")} (create it to download into it)')
        cls = CIFAR10 if name == 'cifar10' else CIFAR100
        try:
            ds = cls(root, train=train, transform=transform, download=bool(_get(data_cfg, 'download', True)))
        except (OSError, RuntimeError) as e:
            raise UserError(f'could not read or download {name} under {root}: {e}') from e
    elif name in ('imagenet', 'folder'):
        ds = _image_folder(data_cfg, 'train' if train else 'val', transform)
    else:
        raise UserError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}")
    return ds, int(_get(data_cfg, 'num_classes') or _num_classes_of(ds))


def data_preprocessing(data_cfg) -> Dict[str, Any]:
    """The preprocessing a data set prescribes (non-null ``mean``, ``std``, ``crop_pct``, ``interpolation``);
    it replaces the model's pretrained-config values for training and is exported with the model."""
    out = {}
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        value = _get(data_cfg, key)
        if value is not None:
            out[key] = tuple(float(v) for v in value) if key in ('mean', 'std') else value
    return out


def _mode(data_config: dict) -> str:
    return 'L' if data_config['input_size'][0] == 1 else 'RGB'


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: a black image, as Pillow < 12 gave."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_randaugment_posterize() -> None:
    """DeiT's RandAugment ``rand-m9-mstd0.5-inc1``: the magnitude noise reaches level 10, where timm's
    'PosterizeIncreasing' keeps 0 bits; recent Pillow raises "bits must be between or equal to 1 and 8" for
    that, older Pillow returned a black image. Restore the old result in timm's op table (idempotent)."""
    from timm.data import auto_augment
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transform(data_config: dict, is_training: bool, aug_cfg=None):
    """timm's ``create_transform`` for ``data_config`` (resolve_data_config of the model), after a mode
    conversion to the model's channel count. ``aug_cfg`` (the recipe's ``aug`` node) sets the training
    augmentation: crop scale / ratio, flips, colour jitter, RandAugment string, random erasing."""
    from timm.data import create_transform
    from torchvision import transforms

    common = dict(
        input_size=tuple(data_config['input_size']),
        interpolation=data_config.get('interpolation', 'bilinear'),
        mean=tuple(data_config['mean']),
        std=tuple(data_config['std']),
    )
    if is_training:
        patch_randaugment_posterize()
        aug = aug_cfg or {}
        scale = _get(aug, 'scale')
        ratio = _get(aug, 'ratio')
        tf = create_transform(
            is_training=True,
            no_aug=bool(_get(aug, 'no_aug', False)),
            scale=tuple(scale) if scale is not None else None,
            ratio=tuple(ratio) if ratio is not None else None,
            hflip=float(_get(aug, 'hflip', 0.5)),
            vflip=float(_get(aug, 'vflip', 0.0)),
            color_jitter=float(_get(aug, 'color_jitter', 0.0) or 0.0),
            auto_augment=_get(aug, 'auto_augment') or None,
            re_prob=float(_get(aug, 're_prob', 0.0)),
            re_mode=_get(aug, 're_mode', 'pixel'),
            re_count=int(_get(aug, 're_count', 1)),
            **{**common, 'interpolation': _get(aug, 'interpolation') or common['interpolation']},
        )
    else:
        tf = create_transform(is_training=False, crop_pct=data_config.get('crop_pct'),
                              crop_mode=data_config.get('crop_mode'), **common)
    return transforms.Compose([ToMode(_mode(data_config)), tf])


def _worker_kwargs(num_workers: int) -> dict:
    return dict(num_workers=num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available())


def create_eval_loader(data_cfg, data_config: dict, batch_size: int, num_workers: int = 0) -> Tuple[DataLoader, int]:
    """The evaluation (test / val) loader of ``data_cfg`` (the Hydra ``data`` node) for a model whose
    ``timm.data.resolve_data_config`` is ``data_config``; returns ``(loader, num_classes)``.

    In order, unshuffled, last batch kept. ``data.eval_subset`` (first n samples) shortens it for tests.
    """
    ds, num_classes = create_dataset(data_cfg, 'eval', build_transform(data_config, is_training=False))
    subset = _get(data_cfg, 'eval_subset')
    if subset is not None:
        ds = Subset(ds, range(min(int(subset), len(ds))))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False, **_worker_kwargs(num_workers))
    return loader, num_classes


def create_train_loader(
        data_cfg,
        data_config: dict,
        batch_size: int,
        aug_cfg=None,
        num_workers: int = 0,
        subset: Optional[int] = None,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        repeated_aug: int = 0,
        seed: int = 0,
) -> Tuple[DataLoader, int]:
    """The shuffled training loader and the class count.

    ``subset``: the first n samples only. Every process reads its own shard of one global order
    (``sampling.train_sampler``). Call ``sampling.set_loader_epoch(loader, epoch)`` before every epoch: order
    and augmentation are then functions of (seed, epoch).
    """
    ds, num_classes = create_dataset(data_cfg, 'train', build_transform(data_config, True, aug_cfg))
    if subset is not None:
        ds = Subset(ds, range(min(int(subset), len(ds))))
    generator = torch.Generator()  # the workers' base seed, reseeded every epoch
    loader = DataLoader(SeededDataset(ds), batch_size=batch_size, drop_last=drop_last, generator=generator,
                        sampler=train_sampler(ds, seed, num_replicas, rank, repeated_aug, drop_last),
                        **_worker_kwargs(num_workers))
    return loader, num_classes
