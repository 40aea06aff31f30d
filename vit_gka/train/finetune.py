"""``finetune=<run folder | weights file | timm name>``: start from trained weights (DeiT's ``--finetune``, timm's
``--initial-checkpoint``), then train with ``recipe=finetune``.

The weights go through timm's ViT checkpoint filter (``vision_transformer.checkpoint_filter_fn``), which resamples
the position embeddings to the new patch grid (another image size) and the patch embedding to another patch
size; the classifier is dropped when the number of classes differs (the new head starts fresh); everything else,
GKA's bandwidths ``log_sigma`` included, is kept. A key of the model that the weights lack, or one of the weights
the model lacks, is one line naming it. A timm name loads that model's published weights (a network is needed:
without one, one line); its architecture must match the run's, as ``finetune=deit_small_patch16_224`` does for
``model=deit shape=small``.
"""
import os
from typing import Dict

import torch

from vit_gka.errors import UserError
from vit_gka.train.checkpoint import MODEL_FILE
from vit_gka.train.loading import find_folder, load_weights

__all__ = ['finetune_weights', 'apply_finetune']

HEAD = ('head.weight', 'head.bias')


def finetune_weights(source: str) -> Dict[str, torch.Tensor]:
    """The state dict ``finetune=`` names: a run folder (its ``model/``), a ``model/`` folder, a weights file, or a
    timm model name with published weights."""
    folder = find_folder(source, (MODEL_FILE,), model=True)
    if folder is not None:
        return load_weights(os.path.join(folder, MODEL_FILE))
    if os.path.isfile(source):
        return load_weights(source)
    if os.path.exists(source):
        raise UserError(f'finetune={source}: no model/model.safetensors in it; give a training run folder, a '
                        f'weights file or a timm model name')
    import timm
    if not timm.is_model(source):
        raise UserError(f'finetune={source}: neither a file or folder nor a timm model name')
    try:
        return timm.create_model(source, pretrained=True).state_dict()
    except Exception as e:  # huggingface_hub / network errors, or no published weights
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f'finetune={source}: could not load its published weights ({type(e).__name__}: {first}); '
                        f'a network is needed, or give a weights file') from e


def apply_finetune(model: torch.nn.Module, source: str) -> str:
    """Load ``source``'s weights into ``model`` (module docstring); returns a line saying what was loaded."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    state = finetune_weights(source)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:  # shapes timm cannot resample
        raise UserError(f'finetune={source}: these weights do not fit the model ({e})') from e
    own = model.state_dict()
    dropped = [k for k in HEAD if k in state and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        del state[key]
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = (f'the model has {missing[0]} that the weights lack' if missing else
                f'the weights have {unexpected[0]} that the model lacks' if unexpected else
                f'{wrong[0]} is {tuple(state[wrong[0]].shape)} in the weights, {tuple(own[wrong[0]].shape)} here')
        raise UserError(f'finetune={source}: another architecture ({what}); fine-tune the same model and shape')
    model.load_state_dict(state, strict=False)
    head = 'a new classifier' if dropped else 'its classifier'
    return f'fine-tuning from {source}: {len(state)} tensors loaded, {head}'
