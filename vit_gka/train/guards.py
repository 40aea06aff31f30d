"""Checks a training job makes once it has its model and data, before it writes anything: each failure one
``UserError`` line (job.py calls them; the value checks of the configuration alone are validation.py's)."""
import os

from vit_gka.data.datasets import class_names
from vit_gka.errors import UserError
from vit_gka.train.checkpoint import CHECKPOINTS, LAST, MODEL_DIR, PREV

__all__ = ['refuse_finished', 'check_patch_grid', 'check_class_maps']


def refuse_finished(run_dir: str) -> None:
    """A fresh start never writes over another run: a run folder with results or a checkpoint is continued
    with ``resume=auto`` or left alone."""
    last = os.path.join(CHECKPOINTS, LAST)
    found = [name for name in ('results.json', last, last + PREV, MODEL_DIR)
             if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise UserError(f'run folder {run_dir} already holds a run ({found[0]}); continue it with resume=auto '
                        f'hydra.run.dir={run_dir}, or give another hydra.run.dir=<folder> (or delete it first)')


def check_patch_grid(model, name: str) -> None:
    """A ViT whose image size its patch size divides: timm would silently drop the rows and columns of a partial
    patch, and fail at the first forward for an image smaller than one patch."""
    embed = getattr(model, 'patch_embed', None)
    if embed is None or not hasattr(embed, 'patch_size'):
        raise UserError(f'{name} is not a vision transformer (no patch embedding); the suite trains timm ViTs: give '
                        f'model=<gka|deit|...> or model=timm model.name=<a vit_* / deit_* model>')
    size, patch = tuple(embed.img_size), tuple(embed.patch_size)
    if getattr(embed, 'dynamic_img_pad', False):
        return
    if any(s < p for s, p in zip(size, patch)):
        raise UserError(f'model.args.img_size={size[0] if size[0] == size[1] else list(size)} is smaller than one '
                        f'patch ({patch[0]} pixels); give model.args.img_size=<a multiple of {patch[0]}>')
    if any(s % p for s, p in zip(size, patch)):
        lost = max(s % p for s, p in zip(size, patch))
        fits = [size[0] // patch[0] * patch[0], (size[0] // patch[0] + 1) * patch[0]]
        raise UserError(f'model.args.img_size={size[0] if size[0] == size[1] else list(size)} is not a multiple of '
                        f'the patch size {patch[0]}: the last {lost} rows and columns would be dropped; give '
                        f'model.args.img_size={fits[0]} or {fits[1]}')


def check_class_maps(data_cfg, train_set, eval_set) -> None:
    """The test split's classes are the training split's (a folder missing in val/ would shift every label
    after it), and ``data.num_classes``, when given, covers them (more is allowed: an ImageNet head trained on a
    subset of its class folders; fewer would give labels the head does not have)."""
    train, test = class_names(train_set), class_names(eval_set)
    if train is not None and test is not None and train != test:
        only_train = [c for c in train if c not in test]
        only_test = [c for c in test if c not in train]
        what = ', '.join(([f'{len(only_train)} only in training (e.g. {only_train[0]})'] if only_train else [])
                         + ([f'{len(only_test)} only in the test split (e.g. {only_test[0]})'] if only_test else [])
                         ) or 'the same names in another order'
        raise UserError(f'the classes of the training and the test split of data {data_cfg.name} differ ({what}); '
                        f'give both splits the same class folders')
    if data_cfg.num_classes is not None and train is not None and int(data_cfg.num_classes) < len(train):
        raise UserError(f'data.num_classes={data_cfg.num_classes}, but data {data_cfg.name} has {len(train)} '
                        f'classes; set data.num_classes={len(train)} (or null: the number of class folders)')
