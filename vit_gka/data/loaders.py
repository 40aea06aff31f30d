"""Training and evaluation loaders, and how many loader processes they use.

Every data set goes one of two ways, chosen by ``batch_augment`` (config; ``batched_dataset``):

* per batch, in the calling process (batched.py): data sets held in memory (Fashion-MNIST, CIFAR) whose
  transform has only crop / resize / flip / normalise steps; no PIL, no worker needed on the CPU;
* per sample, through timm's PIL transform, in loader workers: everything else (folders, tar files, timm's
  data sets, RandAugment and the rest of ``recipe=deit``), WebDataset streams included (streaming.py).

Both give the same images for the same (seed, epoch, position): sampling.py seeds every sample alike.
"""
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vit_gka.data.batched import BatchTransform, InMemoryImages, collate_batched, in_memory_arrays
from vit_gka.data.datasets import Transformed, build_transform, class_names, create_dataset
from vit_gka.data.sampling import SeededDataset, train_sampler
from vit_gka.data.streaming import StreamingImages
from vit_gka.errors import UserError

__all__ = ['create_train_loader', 'TrainLoaderSettings', 'create_eval_loader', 'loader_workers', 'batched_dataset',
           'MAX_AUTO_WORKERS', 'BATCH_AUGMENT']

BATCH_AUGMENT = ('auto', True, False)
# DeiT's loader processes per GPU: more rarely pay once decoding and augmentation keep up with the GPU
MAX_AUTO_WORKERS = 10


def loader_workers(workers, local_processes: int = 1, batched: bool = False, on_cpu: bool = True) -> int:
    """``workers`` (config) as a number of loader processes per training process. ``auto``: the CPUs this process
    may run on (its affinity mask: a Slurm allocation, ``taskset``), shared among the node's ``local_processes``
    training processes, less one for the training loop itself, at most ``MAX_AUTO_WORKERS``: 1 on a 2-core
    laptop, 10 per GPU on an 8-GPU node of 96 cores, 0 (load in the training process) with a single CPU.
    A ``batched`` data set (transformed per batch, a few milliseconds a batch) on a CPU-only run: 0, since a
    worker would only take a core from the model."""
    if workers != 'auto':
        return int(workers)
    if batched and on_cpu:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(1, local_processes) - 1))


def batched_dataset(dataset: Dataset, transform, batch_augment='auto') -> Optional[InMemoryImages]:
    """``dataset`` (from ``create_dataset``, without a transform) as an ``InMemoryImages`` transformed per batch
    by ``transform`` (``build_transform``), or None for the per-sample path. ``batch_augment``: ``auto`` (per
    batch where possible), ``true`` (per batch, else a ``UserError`` naming the reason) or ``false``."""
    if batch_augment not in BATCH_AUGMENT:
        raise UserError(f'batch_augment must be auto, true or false, not {batch_augment!r}')
    if batch_augment is False:
        return None
    arrays = in_memory_arrays(dataset)
    if arrays is None:
        if batch_augment is True:
            raise UserError(f'batch_augment=true needs a data set held in memory (fashion_mnist, cifar10, '
                            f'cifar100), not {type(dataset).__name__}; set batch_augment=auto')
        return None
    images, targets = arrays
    batch_transform, why = BatchTransform.of(transform, tuple(images.shape[2:]), images.shape[1])
    if batch_transform is None:
        if batch_augment is True:
            raise UserError(f'batch_augment=true cannot apply {why} to a whole batch; set batch_augment=auto '
                            f'(that transform then runs per sample) or turn that augmentation off')
        return None
    return InMemoryImages(images, targets, batch_transform, class_names(dataset))


def _worker_kwargs(num_workers: int) -> dict:
    # persistent workers live across epochs; the sampler (order, per-sample seeds) still runs in this process
    return dict(num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def _head(ds: Dataset, n: Optional[int]) -> Dataset:
    if n is None:
        return ds
    n = min(int(n), len(ds))
    return ds.head(n) if isinstance(ds, InMemoryImages) else Subset(ds, range(n))


def create_eval_loader(data_cfg, data_config: dict, batch_size: int, num_workers: Union[int, str] = 0,
                       batch_augment='auto', local_processes: int = 1, on_cpu: bool = True) -> Tuple[DataLoader, int]:
    """The evaluation (test / val) loader of ``data_cfg`` (the Hydra ``data`` node) for a model whose
    ``timm.data.resolve_data_config`` is ``data_config``; returns ``(loader, num_classes)``.

    In order, unshuffled, last batch kept. ``data.eval_subset`` (first n samples) shortens it for tests.
    ``num_workers``: a number or ``auto`` (``loader_workers``).
    """
    ds, num_classes = create_dataset(data_cfg, 'eval')
    transform = build_transform(data_config, is_training=False)
    if isinstance(ds, StreamingImages):
        if data_cfg.eval_subset is not None:
            raise UserError(f'data.eval_subset needs a data set with an index, not the stream {data_cfg.name}; '
                            f'set data.eval_subset=null')
        workers = loader_workers(num_workers, local_processes, False, on_cpu)
        ds.configure(transform, batch_size, workers)
        return DataLoader(ds, batch_size=batch_size, **_worker_kwargs(workers)), num_classes
    batched = batched_dataset(ds, transform, batch_augment)
    ds = _head(batched if batched is not None else Transformed(ds, transform), data_cfg.eval_subset)
    workers = loader_workers(num_workers, local_processes, batched is not None, on_cpu)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False,
                        collate_fn=collate_batched if batched is not None else None, **_worker_kwargs(workers))
    return loader, num_classes


@dataclasses.dataclass(frozen=True)
class TrainLoaderSettings:
    """How ``create_train_loader`` loads: the run's config (``from_config``) and where this process stands in it."""
    batch_size: int                         # per process
    aug: Any                                # the recipe's ``aug`` node: the training transform's augmentation
    num_workers: Union[int, str] = 0        # loader processes per training process, or ``auto`` (loader_workers)
    subset: Optional[int] = None            # the first n samples only; None: all
    drop_last: bool = False                 # drop a short last batch (mixup / cutmix pair the images)
    num_replicas: int = 1                   # training processes, each reading its own shard of one order
    rank: int = 0                           # this process's shard
    repeated_aug: int = 0                   # DeiT's repeated augmentation: each image this many times (0, 1: off)
    seed: int = 0                           # order and augmentation are functions of (seed, epoch)
    batch_augment: Union[bool, str] = 'auto'  # per batch or per sample (batched_dataset)
    local_processes: int = 1                # training processes on this node, sharing its CPUs (loader_workers)
    on_cpu: bool = True                     # training on the CPU: a batched data set needs no worker

    @classmethod
    def from_config(cls, cfg, num_replicas: int, rank: int, on_cpu: bool, drop_last: bool) -> 'TrainLoaderSettings':
        """train.py's settings from its Hydra config ``cfg``; the process layout from Accelerate."""
        return cls(int(cfg.batch_size), cfg.aug, num_workers=cfg.workers, subset=cfg.train_subset,
                   drop_last=drop_last, num_replicas=num_replicas, rank=rank, repeated_aug=int(cfg.repeated_aug or 0),
                   seed=int(cfg.seed), batch_augment=cfg.batch_augment, on_cpu=on_cpu,
                   local_processes=int(os.environ.get('LOCAL_WORLD_SIZE', 1)))  # set by torchrun / accelerate

    def for_eval(self) -> Dict[str, Any]:
        """The keywords of ``create_eval_loader`` that the evaluation loader shares with the training one."""
        return dict(num_workers=self.num_workers, batch_augment=self.batch_augment,
                    local_processes=self.local_processes, on_cpu=self.on_cpu)


def create_train_loader(dataset: Dataset, data_config: dict, settings: TrainLoaderSettings) -> DataLoader:
    """The shuffled training loader of ``dataset`` (``create_dataset(data_cfg, 'train')``, no transform), with
    the training transform of ``data_config`` (``timm.data.resolve_data_config`` of the model) and
    ``settings.aug``, per batch or per sample as ``settings.batch_augment`` says (module docstring).

    Every process reads its own shard of one global order (``sampling.train_sampler``). Call
    ``sampling.set_loader_epoch(loader, epoch)`` before every epoch: order and augmentation are then functions of
    (seed, epoch).
    """
    s = settings
    transform = build_transform(data_config, True, s.aug)
    if isinstance(dataset, StreamingImages):
        return _streaming_train_loader(dataset, transform, s)
    batched = batched_dataset(dataset, transform, s.batch_augment)
    # the sampler yields (index, seed) pairs: InMemoryImages takes them per batch, SeededDataset per sample
    ds = _head(batched, s.subset) if batched is not None else SeededDataset(_head(Transformed(dataset, transform),
                                                                                   s.subset))
    workers = loader_workers(s.num_workers, s.local_processes, batched is not None, s.on_cpu)
    generator = torch.Generator()  # the workers' base seed, reseeded every epoch
    return DataLoader(ds, batch_size=s.batch_size, drop_last=s.drop_last, generator=generator,
                      sampler=train_sampler(ds, s.seed, s.num_replicas, s.rank, s.repeated_aug, s.drop_last),
                      collate_fn=collate_batched if batched is not None else None, **_worker_kwargs(workers))


def _streaming_train_loader(dataset: StreamingImages, transform, s: TrainLoaderSettings) -> DataLoader:
    """The training loader of a WebDataset (streaming.py): timm's reader shards, shuffles and counts; every
    worker yields whole batches, so ``drop_last`` has nothing to drop. ``workers=auto`` is capped at the shards
    each process has (every worker needs one)."""
    if s.num_replicas > 1 and s.repeated_aug and s.repeated_aug > 1:
        raise UserError(f'repeated_aug={s.repeated_aug} repeats indices of a map-style data set; the stream '
                        f'{dataset.name} has none: set repeated_aug=0')
    workers = loader_workers(s.num_workers, s.local_processes, False, s.on_cpu)
    if s.num_workers == 'auto':
        workers = min(workers, max(1, dataset.num_shards // max(1, s.num_replicas)))
    dataset.configure(transform, s.batch_size, workers, s.seed, s.rank, s.num_replicas, s.subset)
    generator = torch.Generator()  # the workers' base seed (and so their shuffle buffers'), reseeded every epoch
    return DataLoader(dataset, batch_size=s.batch_size, generator=generator, **_worker_kwargs(workers))
