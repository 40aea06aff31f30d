"""Fashion-MNIST written out as an ImageNet-style folder of RGB JPEGs, for runs of the ImageNet recipe where no
ImageNet is at hand (a GPU machine with no network, a cluster smoke test):

    python -m benchmarks.fmnist_folder /tmp/fmnist224 --size 224 --train-per-class 1000 --val-per-class 100
    python train.py recipe=deit model=gka shape=small data=folder data.root=/tmp/fmnist224

``<out>/train/<class>/<n>.JPEG`` and ``<out>/val/<class>/<n>.JPEG`` (class folders named by the label and the name
torchvision gives the class, ``0_T-shirt_top`` ... ``9_Ankle boot``, so that their sorted order is the label order
and any ImageFolder reader, timm's ``validate.py`` included, maps them to Fashion-MNIST's labels), each image resized with bicubic interpolation and repeated to 3 channels, the first
n images of each class of the training and test splits. Fashion-MNIST is found as ``data=fashion_mnist`` finds it
(the Debian package, or ``--root``). JPEG encoding runs in a process pool (PIL's encoder holds the GIL).
"""
import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

from vit_gka.cli import compose_option
from vit_gka.data.datasets import fashion_mnist_root
from vit_gka.errors import UserError, fail


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m benchmarks.fmnist_folder', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', help='the folder to write (train/ and val/ inside)')
    p.add_argument('--size', type=int, default=224, help='image side in pixels (default: %(default)s)')
    p.add_argument('--train-per-class', type=int, default=1000, help='training images per class (default: %(default)s)')
    p.add_argument('--val-per-class', type=int, default=100, help='test images per class (default: %(default)s)')
    p.add_argument('--quality', type=int, default=90, help='JPEG quality (default: %(default)s)')
    p.add_argument('--format', choices=('jpeg', 'png'), default='jpeg',
                   help='jpeg: RGB .JPEG as ImageNet; png: lossless gray .png, the exact test set (default: %(default)s)')
    p.add_argument('--root', default=None, help="Fashion-MNIST's data.root (default: the Debian package)")
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='encoding processes (default: %(default)s)')
    return p


def class_folder(label: int, name: str) -> str:
    """``<label>_<name>`` ('T-shirt/top' as 'T-shirt_top'): sorted, the folders come in label order (10 classes,
    one digit each)."""
    return f"{label}_{name.replace('/', '_')}"


def _write(job) -> None:
    from PIL import Image
    pixels, path, size, quality = job
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    if path.endswith('.png'):
        image.save(path)
    else:
        image.convert('RGB').save(path, quality=quality)


def jobs(split: str, dataset, per_class: int, out: str, size: int, quality: int, suffix: str = '.JPEG'):
    """(pixels, path, size, quality) for the first ``per_class`` images of each class of ``dataset``."""
    counts = {}
    for index, label in enumerate(dataset.targets.tolist()):
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = os.path.join(out, split, class_folder(label, dataset.classes[label]))
        os.makedirs(folder, exist_ok=True)
        yield dataset.data[index].numpy(), os.path.join(folder, f'{index:05d}{suffix}'), size, quality


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    if min(args.size, args.train_per_class, args.val_per_class, args.workers) < 1:
        fail('--size, --train-per-class, --val-per-class and --workers must be at least 1')
    if os.path.exists(args.out) and os.listdir(args.out):
        fail(f'{args.out} exists and is not empty; give a new folder')
    from torchvision.datasets import FashionMNIST
    cfg = compose_option('data', 'fashion_mnist')
    cfg.root, cfg.download = args.root, False
    try:
        root, _ = fashion_mnist_root(cfg)
    except UserError as e:
        fail(str(e))
    splits = {'train': (True, args.train_per_class), 'val': (False, args.val_per_class)}
    with ProcessPoolExecutor(args.workers) as pool:
        for split, (train, per_class) in splits.items():
            dataset = FashionMNIST(root, train=train)
            suffix = '.png' if args.format == 'png' else '.JPEG'
            written = sum(1 for _ in pool.map(_write, jobs(split, dataset, per_class, args.out, args.size,
                                                               args.quality, suffix), chunksize=64))
            print(f'{split}: {written} images of {len(dataset.classes)} classes -> {os.path.join(args.out, split)}')


if __name__ == '__main__':
    main()
