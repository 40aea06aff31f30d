"""Data sets and loaders: Fashion-MNIST (default, offline), ImageNet / any ImageFolder pair, CIFAR-10/100, and
``data=timm`` (timm_sets.py).

Every data set is read into a map-style dataset and transformed with timm's ``create_transform`` from
the model's data config (``timm.data.resolve_data_config``): input size, mean / std, interpolation and
crop. Grayscale sources feed 1-channel models directly and are repeated to RGB for 3-channel models.

Fashion-MNIST is looked up, in order, in the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``, decompressed once into a cache folder where torchvision's
``FashionMNIST`` expects them: ``<cache>/FashionMNIST/raw/``), then under ``data.root`` (its
``FashionMNIST/raw/`` decompressed, or the four .gz files there or directly under ``data.root``: decompressed
into the cache folder), then downloaded by torchvision (``data.download``).

The training set is read once (``create_dataset``, before the model: its class count sizes the head) and
given the model's transform by ``loaders.create_train_loader``. Loaders: loaders.py.

The ``data`` config node (``conf/data/*.yaml``) names the data set (``name``) and where it lives; see
the yaml files for the keys.

The training order and every sample's augmentation are functions of (seed, epoch): see sampling.py.

Unreadable images in an ImageFolder (corrupt, truncated, not an image, not a regular file such as a FIFO, which
would block the reader): skipped, not fatal. The next image of
the folder stands in for it, a warning names the file (once), and the number of such files (over all loader
workers) is reported per epoch and in results.json (``unreadable_images``); ``MAX_UNREADABLE_IN_A_ROW`` in a
row stop the run.
"""
import gzip
import logging
import multiprocessing
import os
import shutil
import stat
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
from torch.utils.data import Dataset, Subset

from vit_gka.data.streaming import StreamingImages
from vit_gka.data.timm_sets import TIMM_PREFIXES, is_timm_name, open_timm_dataset
from vit_gka.errors import UserError

log = logging.getLogger('vit_gka.data')

__all__ = ['DATASETS', 'create_dataset', 'data_preprocessing', 'build_transform', 'fashion_mnist_root',
           'unreadable_images', 'class_names', 'Transformed']

DATASETS = ('fashion_mnist', 'imagenet', 'folder', 'cifar10', 'cifar100', 'timm')
FMNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
MAX_UNREADABLE_IN_A_ROW = 20


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
    2. ``data.root`` holding ``FashionMNIST/raw/`` with the decompressed files (read there), or with only the
       .gz files, or the four .gz files directly under ``data.root`` (both decompressed once into
       ``data.cache_dir``, where torchvision, which reads decompressed files only, then finds them);
    3. ``data.root`` (or the cache folder) with ``download=True`` when ``data.download`` is set.
    """
    system_dir = _expand(data_cfg.system_dir)
    cache = os.path.join(_expand(data_cfg.cache_dir), 'fashion_mnist')
    root = _expand(data_cfg.root)
    if root is not None and not os.path.isdir(root):
        raise UserError(f'data.root does not exist: {data_cfg.root}; give data.root=<an existing folder>')
    sources = [system_dir] if root is None else [os.path.join(root, 'FashionMNIST', 'raw'), root]
    if root is not None and _has_fmnist(sources[0]):
        return root, False
    for source in sources:
        if _has_fmnist(source, '.gz'):
            raw = os.path.join(cache, 'FashionMNIST', 'raw')
            if not _has_fmnist(raw):
                _decompress_into(source, raw)
            return cache, False
    if data_cfg.download:
        return root or cache, True
    raise UserError(
        'Fashion-MNIST not found: install the Debian package dataset-fashion-mnist, or set data.root to a '
        'folder holding FashionMNIST/raw/, or set data.download=true')


def printable(text: str) -> str:
    """``text`` (a file name) as valid UTF-8: the bytes of a name that is not UTF-8 (which Python keeps as lone
    surrogates, and a log handler could not encode) as ``\\xNN`` escapes."""
    return os.fsencode(text).decode('utf-8', 'backslashreplace') if isinstance(text, str) else str(text)


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
        path = self.reader.filename(index, absolute=True)
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device: opening it could block for ever
            raise OSError('not a regular file')
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
                bad = printable(self.reader.filename(index, absolute=True))
                if not self.unreadable[index]:
                    self.unreadable[index] = 1
                    log.warning('unreadable image %s (%s): the next image stands in for it', bad,
                                printable(' '.join(str(e).split())))
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
    root = _expand(data_cfg.root)
    if root is None:
        raise UserError(f'data.root is not set (data={data_cfg.name} reads <root>/<split folder>); '
                        f'give data.root=<folder>')
    if not os.path.isdir(root):
        raise UserError(f'data.root does not exist: {data_cfg.root}; give data.root=<an existing folder>')
    sub = data_cfg.train_dir if split == 'train' else data_cfg.val_dir
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
        raise UserError(f'{split} folder does not exist: {folder} (data.root should hold {sub}/<class>/<images>)')
    return CheckedImageFolder(folder, transform=transform)


def _labels_of(ds: Dataset) -> Optional[list]:
    """The class names of a data set: torchvision's ``classes``, or a timm reader's ``class_to_idx``."""
    while isinstance(ds, (Subset, Transformed)):
        ds = ds.dataset
    if getattr(ds, 'classes', None):
        return list(ds.classes)
    reader = getattr(ds, 'reader', None)  # timm's folder reader names it class_to_idx, its tar reader otherwise
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None)
    if class_to_idx:
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    return None


def _num_classes_of(ds: Dataset) -> int:
    labels = _labels_of(ds)
    if labels is None:
        raise UserError(f'cannot tell the number of classes of {type(ds).__name__}; set data.num_classes=<n>')
    return len(labels)


def create_dataset(data_cfg, split: str, transform=None) -> Tuple[Dataset, int]:
    """The ``split`` ('train' or 'eval') of the data set named by ``data_cfg.name`` and its class count."""
    name = data_cfg.name
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
        root = _expand(data_cfg.root) or os.path.join(_expand(data_cfg.cache_dir), name)
        if data_cfg.root not in (None, '') and not os.path.isdir(root):
            raise UserError(f'data.root does not exist: {data_cfg.root} (create it to download into it)')
        cls = CIFAR10 if name == 'cifar10' else CIFAR100
        try:
            ds = cls(root, train=train, transform=transform, download=bool(data_cfg.download))
        except (OSError, RuntimeError) as e:
            raise UserError(f'could not read or download {name} under {root}: {e}') from e
    elif name in ('imagenet', 'folder'):
        ds = _image_folder(data_cfg, 'train' if train else 'val', transform)
    elif is_timm_name(name):
        ds = open_timm_dataset(data_cfg, _expand(data_cfg.root), train)
        if transform is not None:
            ds = Transformed(ds, transform) if not isinstance(ds, StreamingImages) else ds.configure(transform, 1, 0)
    else:
        raise UserError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}, or data=timm "
                        f"data.name=<{'|'.join(p + '/...' for p in TIMM_PREFIXES)}|tar>")
    return ds, int(data_cfg.num_classes or _num_classes_of(ds))


def data_preprocessing(data_cfg) -> Dict[str, Any]:
    """The preprocessing a data set prescribes (non-null ``mean``, ``std``, ``crop_pct``, ``interpolation``);
    it replaces the model's pretrained-config values for training and is exported with the model."""
    out = {}
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        value = data_cfg[key]
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
    conversion to the model's channel count. ``aug_cfg`` (the recipe's ``aug`` node; training only) sets the
    training augmentation: crop scale / ratio, flips, colour jitter, RandAugment string, random erasing."""
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
        aug = aug_cfg
        tf = create_transform(
            is_training=True,
            no_aug=bool(aug.no_aug),
            scale=tuple(aug.scale) if aug.scale is not None else None,
            ratio=tuple(aug.ratio) if aug.ratio is not None else None,
            hflip=float(aug.hflip),
            vflip=float(aug.vflip),
            color_jitter=float(aug.color_jitter or 0.0),
            auto_augment=aug.auto_augment or None,
            re_prob=float(aug.re_prob),
            re_mode=aug.re_mode,
            re_count=int(aug.re_count),
            **{**common, 'interpolation': aug.interpolation or common['interpolation']},
        )
    else:
        tf = create_transform(is_training=False, crop_pct=data_config.get('crop_pct'),
                              crop_mode=data_config.get('crop_mode'), **common)
    return transforms.Compose([ToMode(_mode(data_config)), tf])


class Transformed(Dataset):
    """``dataset`` (yielding ``(image, target)``) with ``transform`` applied to its images."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return self.transform(img), target


def class_names(dataset: Dataset) -> Optional[list]:
    """The class names of a data set from ``create_dataset`` (folder names, torchvision's labels, a timm
    reader's classes), or None."""
    labels = _labels_of(dataset)
    return [str(c) for c in labels] if labels else None
