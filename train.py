"""Train a GKA (or baseline) ViT: ``python train.py [overrides]``, the same as the ``vit-gka-train`` command.

The entry point is ``vit_gka/train/main.py``, the run ``vit_gka/train/job.py``, the configs ``conf/``.
"""
from vit_gka.train.main import main

if __name__ == '__main__':
    main()
