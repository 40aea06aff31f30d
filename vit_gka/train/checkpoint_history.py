"""``checkpoint_keep=<n>``: the checkpoints of the last n epochs beside ``checkpoints/last`` (timm's
``--checkpoint-hist``), as ``checkpoints/epoch_<k>``; each one resumes as ``last`` does (``resume=<it>``).

The files are hard links of ``last``'s: ``last`` is replaced by renames at the next checkpoint, so the links keep
this epoch's files and no weight is written twice (a copy where the file system has no hard links). An epoch's
folder is filled beside its place and renamed into it: a crash leaves it whole or absent.
"""
import os
import re
import shutil
from typing import List

__all__ = ['keep_epoch_checkpoint', 'epoch_checkpoints']

_EPOCH = re.compile(r'^epoch_(\d+)$')


def epoch_checkpoints(checkpoints_dir: str) -> List[str]:
    """The ``epoch_<k>`` folders of ``checkpoints_dir``, oldest first."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(checkpoints_dir) if (m := _EPOCH.match(name))]
    return [os.path.join(checkpoints_dir, name) for _, name in sorted(found)]


def keep_epoch_checkpoint(last_dir: str, epoch: int, keep: int) -> None:
    """With ``keep`` > 0: ``last_dir`` (just written at the end of ``epoch``) also as ``epoch_<epoch>`` beside it,
    then the oldest epoch folders beyond ``keep`` removed. ``keep`` 0: nothing (only ``last``)."""
    if keep <= 0:
        return
    parent = os.path.dirname(last_dir)
    target = os.path.join(parent, f'epoch_{epoch}')
    tmp = f'{target}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(last_dir):
        src, dst = os.path.join(last_dir, name), os.path.join(tmp, name)
        try:
            os.link(src, dst)
        except OSError:  # no hard links here (some network file systems)
            shutil.copy2(src, dst)
    shutil.rmtree(target, ignore_errors=True)  # a resumed run that ends this epoch again
    os.rename(tmp, target)
    for old in epoch_checkpoints(parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
