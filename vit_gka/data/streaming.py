"""``data=timm data.name=wds/<name>``: WebDataset shards (tar files of ``<key>.jpg`` / ``.png`` + ``<key>.cls``,
listed with their sample counts in ``<data.root>/_info.json``), streamed by timm's ``ReaderWds``.

timm's reader does the streaming work: shard order shuffled per epoch under a seed common to every process,
shards split over processes and loader workers, a sample shuffle buffer, exactly ``ceil(samples / (processes x
workers))`` samples per worker (rounded up to whole batches, wrapping around its shards), so that every process
steps the same number of times. What it leaves to the caller is wired here: the rank and world size of the
training split (given, not read from ``torch.distributed``), the loader's worker count before the workers start,
the epoch, and evaluation without sharding (``accelerator.prepare`` shards the evaluation loader of a several-
process run, which must not be split a second time).

Not exact, unlike the map-style data sets (sampling.py): a streamed epoch's order depends on the worker count,
and each loader worker's augmentation and shuffle buffer are seeded once when it starts. A ``resume=`` continues
with the checkpoint's weights, optimizer, schedule and step count; the samples it sees then differ from those
of an uninterrupted run (docs/reliability.md).
"""
import os
from itertools import islice
from typing import Optional

from torch.utils.data import IterableDataset

from vit_gka.errors import UserError

__all__ = ['StreamingImages', 'open_streaming']


class StreamingImages(IterableDataset):
    """One split of a WebDataset, as timm's ``IterableImageDataset`` (``dataset``), with the settings of one
    loader: ``configure`` (before the loader's workers start), then ``set_epoch`` before every epoch."""

    def __init__(self, dataset, name: str, train: bool, open_again):
        self.dataset, self.name, self.train, self._open_again = dataset, name, train, open_again
        self.seed = 0

    @property
    def reader(self):
        return self.dataset.reader

    @property
    def num_shards(self) -> int:
        return len(self.reader.split_info.filenames)

    def configure(self, transform, batch_size: int, num_workers: int, seed: int = 0, rank: int = 0,
                  num_replicas: int = 1, num_samples: Optional[int] = None) -> 'StreamingImages':
        """Set the transform, batch size, worker count, seed, this process's shard (training split only: an
        evaluation split is read whole, sharded by Accelerate) and ``num_samples`` (the first n of an epoch:
        ``train_subset``). The reader's own attributes are set here because timm reads them from
        ``torch.distributed`` and its own arguments at construction, before the loader is known."""
        reader = self.reader
        if not self.train:
            rank, num_replicas = 0, 1
        workers = max(1, int(num_workers))  # no worker: the main process reads, as one worker
        if self.train and self.num_shards < workers * num_replicas:
            raise UserError(f'data.name={self.name}: {self.num_shards} training shards cannot feed {num_replicas} '
                            f'process(es) x {workers} loader worker(s), each needs a shard of its own; set '
                            f'workers={max(0, self.num_shards // num_replicas)} or write more shards')
        self.dataset.transform = transform
        self.seed = int(seed)
        reader.common_seed = self.seed  # the shard order's seed, the same in every process (with the epoch)
        reader.batch_size = int(batch_size)
        reader.dist_rank, reader.dist_num_replicas = int(rank), int(num_replicas)
        if num_samples is not None:
            reader.num_samples = min(int(num_samples), reader.split_info.num_samples)
        self.dataset.set_loader_cfg(num_workers=workers)  # timm's: the per-worker sample count follows it
        return self

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds the shard order (a shared counter: loader workers already running see it)."""
        self.dataset.set_epoch(int(epoch))

    def __iter__(self):
        return iter(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def first(self, n: int) -> list:
        """The first ``n`` samples of the split (``configure``'s transform), read by a reader of their own: this
        one's pipeline is built inside each loader worker, and iterating it here would build it in this
        process and leave it unsplit among the workers."""
        other = self._open_again()
        other.dataset.transform = self.dataset.transform
        other.reader.dist_rank, other.reader.dist_num_replicas = 0, 1
        return list(islice(iter(other.dataset), n))


def open_streaming(data_cfg, root: Optional[str], train: bool) -> StreamingImages:
    """Open split ``data.train_dir`` / ``data.val_dir`` of ``data.name=wds/<name>`` under ``root``
    (``data.root``, holding ``_info.json`` and the shards) with timm's ``create_dataset``."""
    from timm.data import create_dataset as timm_create_dataset
    name, split = str(data_cfg.name), str(data_cfg.train_dir if train else data_cfg.val_dir)
    if root is None or not os.path.isdir(root):
        raise UserError(f'data.name={name} reads WebDataset shards from data.root, which is '
                        f'{"not set" if root is None else "not a folder: " + root}; give data.root=<the folder of '
                        f'_info.json and the .tar shards>')
    try:
        import webdataset  # noqa: F401  (timm's reader needs it; its own error names a git URL)
    except ImportError as e:
        raise UserError(f"data.name={name} needs the webdataset package: pip install 'vit-gka[wds]'") from e
    mode = 'L' if int(data_cfg.in_chans or 3) == 1 else 'RGB'

    def open_split() -> StreamingImages:
        try:
            ds = timm_create_dataset(name, root=root, split=split, is_training=train, input_img_mode=mode)
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            raise UserError(f'data.name={name} (timm.data.create_dataset, split {split}, root {root}): '
                            f'{str(e).splitlines()[0] if str(e) else type(e).__name__}; a WebDataset root holds '
                            f'_info.json listing each split\'s shard files and sample counts') from e
        return StreamingImages(ds, name, train, open_split)

    ds = open_split()
    if train and not ds.num_shards:
        raise UserError(f'data.name={name}: split {split} under {root} lists no shards')
    return ds

