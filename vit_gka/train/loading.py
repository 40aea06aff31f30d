"""Reading weights and training states safely, and checking weights against a model.

``load_weights`` (one weights file) and ``load_state`` (a torch file of plain containers, such as a checkpoint's
state.pt) are the only readers. Weights come from safetensors (or, for a foreign ``.pth``, through
``torch.load(weights_only=True)``), the training state through ``torch.load(weights_only=True)``: a pickle
that would import anything but tensors and plain containers is refused before any of it runs.
``check_weights`` compares weights with a model (architecture, classes, shapes) before anything is copied, so
a mismatch never leaves a half-loaded model; ``describe_load_error`` names the first mismatch of a strict
``load_state_dict`` that failed (eval.py's load through timm). Every failure is a one-line ``UserError``.
The checkpoint folder, its schema and resuming from it: state.py.
"""
import os
import pickle
import re
import warnings
from typing import Any, Dict

import torch
from safetensors.torch import load_file

from vit_gka.errors import UserError

__all__ = ['load_weights', 'load_state', 'check_weights', 'describe_load_error', 'first_line']


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_state(path: str) -> Any:
    """``torch.load(path, weights_only=True)``, with one-line errors: a pickle that would import code is
    refused (and none of it runs), a truncated or foreign file is named as such."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head.startswith((b'PK\x03\x04', b'\x80')):  # neither torch's zip format nor a pickle (protocol >= 2)
        raise UserError(f'{path} is truncated or not a checkpoint ({"empty" if not head else "not a torch file"}); '
                        f'use another checkpoint (checkpoints/last.prev, or a run folder)')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only load failed' not in str(e).lower():
            raise UserError(f'{path} is truncated or not a checkpoint ({first_line(e)})') from e
        found = re.search(r'Unsupported (?:global: GLOBAL (\S+)|operand (\d+))', str(e))
        what = (f'unpickling it would call {found.group(1)}' if found and found.group(1) else
                f'it is a pickle the safe loader cannot vet (opcode {found.group(2)})' if found else
                'it holds more than tensors and plain containers')
        raise UserError(f'refusing to load {path}: {what}, and unpickling it fully could run code; torch.load('
                        f'weights_only=True) stopped before any of it ran. Only use checkpoints this code wrote or '
                        f'that you trust') from e
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, KeyError, EOFError, ... for bad files)
        raise UserError(f'{path} is truncated or not a checkpoint ({type(e).__name__}: {first_line(e)}); use '
                        f'another checkpoint (checkpoints/last.prev, or a run folder)') from e


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """A weights file as a state dict: ``.safetensors`` (safetensors), else ``torch.load(weights_only=True)``
    of a state dict or a timm-style ``{'state_dict' | 'model' | 'state_dict_ema': ...}``."""
    if not os.path.isfile(path):
        raise UserError(f'weights file does not exist: {path}')
    if str(path).endswith('.safetensors'):
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError)
            raise UserError(f'{path} is truncated or not a safetensors file ({first_line(e)}); use another '
                            f'checkpoint') from e
    obj = load_state(path)
    if isinstance(obj, dict):
        for key in ('state_dict', 'model', 'state_dict_ema'):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f'{path} is not a weights file (no state dict of tensors in it)')
    return obj


def _classes(shape) -> str:
    return str(shape[0]) if len(shape) else '?'


def check_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor], what: str) -> None:
    """``UserError`` naming the first mismatch between ``weights`` and ``model`` (another architecture,
    another number of classes, another shape); nothing is loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = ([f'{len(missing)} tensors of the model missing (e.g. {missing[0]})'] if missing else []) + (
            [f'{len(unexpected)} not in the model (e.g. {unexpected[0]})'] if unexpected else [])
        raise UserError(f'{what} is another architecture: {", ".join(parts)}')
    for key, ref in expected.items():
        got = tuple(weights[key].shape)
        if got != tuple(ref.shape):
            head = getattr(model, 'default_cfg', {}).get('classifier', 'head')
            if key.startswith(head + '.') and got[1:] == tuple(ref.shape)[1:]:
                raise UserError(f'{what} has {_classes(got)} classes ({key} {list(got)}), the model '
                                f'{_classes(ref.shape)}; use a checkpoint trained on this data set')
            raise UserError(f'{what} does not match the model: {key} is {list(got)} in the checkpoint, '
                            f'{list(ref.shape)} in the model')


def describe_load_error(e: BaseException) -> str:
    """The first concrete mismatch in a ``load_state_dict`` error (missing / unexpected key, size mismatch)."""
    text = str(e)
    size = re.search(r'size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from '
                     r'checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)', text)
    if size:
        return f'{size.group(1)} is {size.group(2)} in the checkpoint, {size.group(3)} in the model'
    for label, pattern in (('missing from the checkpoint', r'Missing key\(s\) in state_dict: "([^"]+)"'),
                           ('not in the model', r'Unexpected key\(s\) in state_dict: "([^"]+)"')):
        found = re.search(pattern, text)
        if found:
            return f'another architecture ({found.group(1)} {label})'
    return first_line(e)
