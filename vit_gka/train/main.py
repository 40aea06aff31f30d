"""``vit-gka-train`` / ``python train.py``: the Hydra entry point of training (configs in ``vit_gka/conf``).

    python train.py                                    # small GKA ViT on Fashion-MNIST (recipe=quick)
    python train.py -m model=gka,deit shape=fmnist  # the quickstart benchmark, then a comparison table
    python train.py experiment=paper_gka_s data.root=/data/imagenet   # = model=gka shape=small data=imagenet recipe=deit
    torchrun --nproc_per_node 2 train.py train_subset=512 epochs=1
    python train.py resume=runs/gka_fmnist/<date> hydra.run.dir=runs/gka_fmnist/<date>   # continue in place

The run itself is ``vit_gka.train.job.run_training``.
"""
import os

import hydra
from omegaconf import DictConfig

from vit_gka.train.cli import check_overrides, exit_on_user_error

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'conf')


@hydra.main(version_base='1.3', config_path='../conf', config_name='config')
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float:
    from vit_gka.train.job import run_training
    results = run_training(cfg)
    return results['top1'] if results else float('nan')


def main() -> None:
    from vit_gka.train.validation import validate
    check_overrides(CONF_DIR, 'config', validate=validate)
    _hydra_main()


if __name__ == '__main__':
    main()
