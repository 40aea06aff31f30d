"""In-memory data sets (Fashion-MNIST, CIFAR) transformed a whole batch at a time, in the training process.

Why by hand: timm's and torchvision's training transforms work on one PIL image at a time. For a 28x28 image
that costs about half a millisecond of a core (decode-free, but a PIL round trip, a crop, a resize, a flip, a
tensor conversion), which a 2-core machine takes from the model. Neither library applies per-sample random
crops to a batch. ``BatchTransform`` reads the timm transform that ``datasets.build_transform`` built and
applies the same steps to a uint8 batch with two matrix products:

* the random parameters of every sample come from timm's and torchvision's own code
  (``RandomResizedCropAndInterpolation.get_params``, the flips' ``torch.rand(1)``), under the same per-sample
  seeds (sampling.py) as the per-sample path: the same crops and flips, so exact resume and the 1-process =
  2-process equality hold as they do there;
* the crop and resize is Pillow's resampling written as matrices (``_pil_weights``): its filters (bilinear
  triangle, bicubic a = -0.5), support widened when shrinking (antialiasing), weights normalised per output
  pixel, quantised to Pillow's fixed point (22 bits), a horizontal pass then a vertical one, each rounded to
  8 bits. The output equals the per-sample path's to the level (tests/test_batched_data.py);
* flips reverse the rows of those matrices; then ``/255`` and ``Normalize`` as torchvision does them.

A transform with any other step (RandAugment, colour jitter, random erasing, ...) is not batched: the data set
then goes through the per-sample path (``batch_augment: auto``), or the run stops with one line naming the step
(``batch_augment: true``).
"""
import functools
import random
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ['BatchTransform', 'InMemoryImages', 'in_memory_arrays', 'collate_batched']

_PRECISION_BITS = 22  # Pillow's fixed-point resampling (libImaging/Resample.c)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


_FILTERS = {'bilinear': (_bilinear, 1.0), 'bicubic': (_bicubic, 2.0)}  # Pillow's filters and their supports


@functools.lru_cache(maxsize=4096)
def _pil_weights(start: int, length: int, in_size: int, out_size: int, interpolation: str,
                 keep: Tuple[int, int], flip: bool) -> torch.Tensor:
    """Pillow's resampling of the source pixels [start, start + length) of a line of ``in_size`` pixels to
    ``out_size`` pixels: an (out, in_size) float64 matrix of fixed-point weights (integers, in units of 2^-22),
    of which the output pixels [keep[0], keep[0] + keep[1]) are kept (a centre crop), in reverse order when
    ``flip``. Cached: a small image has few distinct crop boxes."""
    fn, _ = _FILTERS[interpolation]
    scale = length / out_size
    filterscale = max(scale, 1.0)  # shrinking widens the filter (antialiasing)
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # in crop coordinates
    x = torch.arange(in_size, dtype=torch.float64) - start  # source pixels in crop coordinates
    weights = fn(((x[None, :] - centers[:, None]) + 0.5) / filterscale)
    weights = weights * ((x >= 0) & (x < length))  # the crop only: Pillow crops first
    weights = weights / weights.sum(-1, keepdim=True)
    scaled = weights * (1 << _PRECISION_BITS)  # Pillow's rounding of a weight: half away from zero
    weights = torch.where(scaled < 0, -(0.5 - scaled).floor(), (scaled + 0.5).floor())
    weights = weights[keep[0]:keep[0] + keep[1]]
    return weights.flip(0) if flip else weights


def _resample(weights: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """One Pillow pass: the fixed-point sums of ``weights @ lines`` rounded and clipped to 8 bits (exact in
    float64: every product is below 2^31)."""
    total = weights @ lines + (1 << (_PRECISION_BITS - 1))
    return torch.floor(total / (1 << _PRECISION_BITS)).clamp_(0.0, 255.0)


class BatchTransform:
    """A timm / torchvision transform (``datasets.build_transform``) applied to a batch of uint8 images of
    shape (B, C, H, W): ``transform(images, seeds)``; ``seeds`` (one per image, sampling.py) drive the random
    steps, None for a transform without any. Build with ``BatchTransform.of``."""

    def __init__(self, image_size: Tuple[int, int], channels: int):
        self.image_size, self.channels = tuple(image_size), channels
        self.out_channels = channels
        self.crop = None         # timm's RandomResizedCropAndInterpolation
        self.resize = None       # (height, width, interpolation) of a deterministic Resize
        self.center = None       # (height, width) of a CenterCrop after the resize
        self.flips = []          # ('h' | 'v', p), in order
        self.mean = self.std = None
        self.to_tensor = False

    @classmethod
    def of(cls, transform, image_size: Tuple[int, int], channels: int) -> Tuple[Optional['BatchTransform'], str]:
        """``(BatchTransform, '')`` for a transform of supported steps, else ``(None, reason)``."""
        from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
        from torchvision import transforms as T
        from vit_gka.data.datasets import ToMode

        out = cls(image_size, channels)
        steps = list(_flatten(transform))
        for step in steps:
            if isinstance(step, ToMode):
                if step.mode == 'L' and channels != 1:
                    return None, 'RGB to grayscale conversion'
                out.out_channels = 1 if step.mode == 'L' else 3
            elif isinstance(step, RandomResizedCropAndInterpolation) and out.crop is None and out.resize is None:
                modes = step.interpolation if isinstance(step.interpolation, (list, tuple)) else [step.interpolation]
                if any(_mode_name(m) not in _FILTERS for m in modes):
                    return None, f'{step!r} (interpolation other than bilinear / bicubic)'
                out.crop = step
            elif isinstance(step, T.Resize) and out.crop is None and out.resize is None and step.max_size is None:
                if _mode_name(step.interpolation) not in _FILTERS:
                    return None, f'{step!r} (interpolation other than bilinear / bicubic)'
                out.resize = (*_resized_size(image_size, step.size), _mode_name(step.interpolation))
            elif isinstance(step, T.CenterCrop) and out.resize is not None and out.center is None:
                out.center = tuple(step.size)
                if out.center[0] > out.resize[0] or out.center[1] > out.resize[1]:
                    return None, f'{step!r} larger than the image (padding)'
            elif isinstance(step, (T.RandomHorizontalFlip, T.RandomVerticalFlip)) and not out.to_tensor:
                out.flips.append(('h' if isinstance(step, T.RandomHorizontalFlip) else 'v', float(step.p)))
            elif isinstance(step, T.ColorJitter) and not any(
                    (step.brightness, step.contrast, step.saturation, step.hue)):
                continue  # timm adds an empty one: a no-op (its only draw comes after every geometric step)
            elif isinstance(step, (MaybeToTensor, T.ToTensor)) and not out.to_tensor:
                out.to_tensor = True
            elif isinstance(step, T.Normalize) and out.to_tensor and out.mean is None:
                out.mean = torch.as_tensor(step.mean, dtype=torch.float32).view(-1, 1, 1)
                out.std = torch.as_tensor(step.std, dtype=torch.float32).view(-1, 1, 1)
            else:
                return None, repr(step).replace('\n', ' ')
        if not out.to_tensor:
            return None, 'no tensor conversion'
        return out, ''

    def _params(self, seeds: Optional[Sequence[int]], batch: int):
        """Per sample: crop boxes (top, left, height, width), filters, horizontal and vertical flips, drawn as the
        per-sample path draws them (sampling.SeededDataset seeds ``random`` with the seed and torch with seed >> 1)."""
        h, w = self.image_size
        fixed = self.resize[2] if self.resize is not None else 'bilinear'
        if seeds is None:
            if self.crop is not None or self.flips:
                raise ValueError('random crops and flips need a seed per sample (sampling.SeededSampler)')
            return [(0, 0, h, w)] * batch, [fixed] * batch, [False] * batch, [False] * batch
        probe = torch.empty(self.channels, h, w)  # get_params reads only the image size
        modes = self.crop.interpolation if self.crop is not None else None
        generator = torch.Generator()
        boxes, names, hflips, vflips = [], [], [], []
        saved = random.getstate()
        try:
            for seed in seeds:
                random.seed(seed)
                if self.crop is not None:
                    boxes.append(self.crop.get_params(probe, self.crop.scale, self.crop.ratio))
                    names.append(_mode_name(random.choice(modes) if isinstance(modes, (list, tuple)) else modes))
                else:
                    boxes.append((0, 0, h, w))
                    names.append(fixed)
                generator.manual_seed(seed >> 1)
                flipped = {'h': False, 'v': False}
                for axis, p in self.flips:  # in the transform's order, each its own draw; two flips undo each other
                    flipped[axis] ^= bool(torch.rand(1, generator=generator) < p)
                hflips.append(flipped['h'])
                vflips.append(flipped['v'])
        finally:
            random.setstate(saved)
        return boxes, names, hflips, vflips

    def __call__(self, images: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        batch, channels, h, w = images.shape
        boxes, names, hflips, vflips = self._params(seeds, batch)
        if self.crop is not None:
            out_h, out_w = self.crop.size
        elif self.resize is not None:
            out_h, out_w = self.resize[:2]
        else:
            out_h, out_w = h, w
        keep_h, keep_w = (0, out_h), (0, out_w)
        if self.center is not None:  # torchvision's CenterCrop offsets
            keep_h = (int(round((out_h - self.center[0]) / 2.0)), self.center[0])
            keep_w = (int(round((out_w - self.center[1]) / 2.0)), self.center[1])
        wy = torch.stack([_pil_weights(int(top), int(height), h, out_h, name, keep_h, vflip)
                          for (top, _, height, _), name, vflip in zip(boxes, names, vflips)])
        wx = torch.stack([_pil_weights(int(left), int(width), w, out_w, name, keep_w, hflip)
                          for (_, left, _, width), name, hflip in zip(boxes, names, hflips)])
        pixels = images.double()
        # Pillow: the horizontal pass first (into 8 bits), then the vertical one
        pixels = _resample(wx[:, None], pixels.transpose(-1, -2)).transpose(-1, -2)
        pixels = _resample(wy[:, None], pixels)
        out = pixels.float().div_(255.0)  # ToTensor
        if self.out_channels != channels:
            out = out.expand(-1, self.out_channels, -1, -1)
        if self.mean is not None:
            out = (out - self.mean) / self.std
        return out.contiguous()

    def __repr__(self) -> str:
        parts = [repr(self.crop) if self.crop is not None else f'Resize{self.resize}' if self.resize else '',
                 f'CenterCrop{self.center}' if self.center else '', *(f'{a}flip(p={p})' for a, p in self.flips)]
        return f"{type(self).__name__}({', '.join(p for p in parts if p)})"


def _flatten(transform):
    from torchvision import transforms as T
    if isinstance(transform, T.Compose):
        for t in transform.transforms:
            yield from _flatten(t)
    else:
        yield transform


def _mode_name(mode) -> str:
    return getattr(mode, 'value', str(mode)).lower()


def _resized_size(image_size: Tuple[int, int], size) -> Tuple[int, int]:
    """The output of torchvision's ``Resize(size)``: an int (or 1-list) is the shorter side."""
    h, w = image_size
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if w <= h:
            return int(short * h / w), short
        return short, int(short * w / h)
    return int(size[0]), int(size[1])


def in_memory_arrays(dataset) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images (N, C, H, W) uint8, targets (N,) int64)`` of a torchvision data set held in memory
    (MNIST / Fashion-MNIST, CIFAR-10 / 100), else None."""
    from torchvision.datasets import CIFAR10, MNIST
    if isinstance(dataset, MNIST):
        return torch.as_tensor(dataset.data).unsqueeze(1), torch.as_tensor(dataset.targets, dtype=torch.int64)
    if isinstance(dataset, CIFAR10):
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)
    return None


class InMemoryImages(Dataset):
    """Images held in memory, transformed per batch: the DataLoader hands ``__getitems__`` a batch's indices
    (or ``(index, seed)`` pairs from ``sampling.SeededSampler``) and gets the batch back whole
    (``collate_batched`` passes it through)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: BatchTransform,
                 classes: Optional[List[str]] = None):
        self.images, self.targets, self.transform, self.classes = images, targets, transform, classes

    def head(self, n: int) -> 'InMemoryImages':
        """The first ``n`` samples."""
        return InMemoryImages(self.images[:n], self.targets[:n], self.transform, self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, items):
        seeded = bool(items) and isinstance(items[0], tuple)
        index = torch.tensor([i[0] if seeded else i for i in items], dtype=torch.int64)
        images = self.transform(self.images[index], [i[1] for i in items] if seeded else None)
        return images, self.targets[index]

    def __getitem__(self, item):
        images, targets = self.__getitems__([item])
        return images[0], int(targets[0])


def collate_batched(batch):
    """The DataLoader's collate function for ``InMemoryImages``: the batch is already one."""
    return batch
