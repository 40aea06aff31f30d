"""``data=timm``: any data set that timm's ``create_dataset`` opens, by timm's name for it (``torch/<name>``,
``hfds/<hub id>``, ``tar`` for ``<data.root>/<split>.tar``, ``wds/<name>`` for WebDataset shards: streaming.py).
The other streaming readers (``hfids/``, ``tfds/``) are refused in one line: untested here, and ``tfds/`` needs
TensorFlow."""
import os
from typing import Optional

from torch.utils.data import Dataset

from vit_gka.data.streaming import open_streaming
from vit_gka.errors import UserError

__all__ = ['TIMM_PREFIXES', 'REFUSED_PREFIXES', 'is_timm_name', 'open_timm_dataset']

TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
REFUSED_PREFIXES = ('hfids', 'tfds')


def is_timm_name(name: str) -> bool:
    """Whether ``data.name`` is one for timm's ``create_dataset`` (a prefix of ``TIMM_PREFIXES``, or ``tar``)."""
    return name == 'tar' or name.partition('/')[0].lower() in TIMM_PREFIXES


def open_timm_dataset(data_cfg, root: Optional[str], train: bool) -> Dataset:
    """``data=timm``: timm's ``create_dataset`` under ``data.name`` (``tar``: the class folders of
    ``<root>/<split>.tar``; ``wds/``: a ``StreamingImages``), split ``data.train_dir`` / ``data.val_dir``;
    ``root``: ``data.root`` expanded. Images untransformed (the caller adds the transform)."""
    from timm.data import create_dataset as timm_create_dataset
    name, split = str(data_cfg.name), str(data_cfg.train_dir if train else data_cfg.val_dir)
    prefix = name.partition('/')[0].lower()
    if prefix in REFUSED_PREFIXES:
        raise UserError(f'data.name={name}: the streaming readers {", ".join(p + "/" for p in REFUSED_PREFIXES)} are '
                        f'not supported; use wds/ (WebDataset shards), hfds/ (map-style Hugging Face data sets), a '
                        f'folder or tar')
    if prefix == 'wds':
        return open_streaming(data_cfg, root, train)
    if name == 'tar':
        root = os.path.join(root or '', f'{split}.tar')
        if not os.path.isfile(root):
            raise UserError(f'data.name=tar reads <data.root>/<split>.tar: {root} is not a file; set data.root=<the '
                            f'folder of {data_cfg.train_dir}.tar and {data_cfg.val_dir}.tar>')
    elif root is not None and not os.path.isdir(root):
        raise UserError(f'data.root does not exist: {data_cfg.root}; give data.root=<an existing folder>')
    try:
        ds = timm_create_dataset('' if name == 'tar' else name, root=root, split=split, is_training=train,
                                 download=bool(data_cfg.download))
    except (AssertionError, ImportError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f'data.name={name} (timm.data.create_dataset, split {split}, root {root}): '
                        f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
    return ds
