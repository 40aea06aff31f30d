"""Train a GKA (or baseline) ViT with the DeiT recipe: Hydra config in conf/, Accelerate for devices.

    python train.py                                    # small GKA ViT on Fashion-MNIST (recipe=quick)
    python train.py -m model=gka_fmnist,deit_fmnist    # the quickstart benchmark, then a comparison table
    python train.py model=gka_deit_small_patch16_224 data=imagenet data.root=/data/imagenet recipe=deit
    accelerate launch --num_processes 2 --cpu train.py train_subset=512 epochs=1
    python train.py resume=runs/gka_fmnist/<date> hydra.run.dir=runs/gka_fmnist/<date>   # continue in place

The loop is vit_gka/engine.py, the job (data, model, optimizer, checkpoints, results.json) vit_gka/trainer.py,
the recipe built from timm vit_gka/recipe.py.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from vit_gka.cli import check_overrides, exit_on_user_error  # noqa: E402

CONF_DIR = os.path.join(ROOT, 'conf')


@hydra.main(version_base='1.3', config_path='conf', config_name='config')
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    from vit_gka.trainer import run_training
    results = run_training(cfg)
    return results['top1'] if results else float('nan')


if __name__ == '__main__':
    from vit_gka.validation import validate
    check_overrides(CONF_DIR, 'config', validate=validate)
    main()
