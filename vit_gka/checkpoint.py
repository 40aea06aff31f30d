"""Checkpoints that are never half-written, and the state that makes ``resume=`` exact.

Layout of a checkpoint folder (``<run>/checkpoints/last/``)::

    model.safetensors      raw model weights (timm key names; loads with
                           timm.create_model(name, pretrained=True,
                                             pretrained_cfg_overlay=dict(file=..., num_classes=N)))
    model_ema.safetensors  EMA weights, when the recipe keeps an EMA
    state.pt               optimizer, scheduler, EMA step, RNG states (per process), epoch and bookkeeping,
                           plain containers only: torch.load(path, weights_only=True) loads it

The folder is written as ``last.tmp-*`` beside it, every file and the folder fsync'ed, then swapped in by
renames: the old ``last`` becomes ``last.prev``, the new one becomes ``last``, ``last.prev`` is removed.
A crash between the two renames leaves ``last.prev`` complete, and ``find_checkpoint`` falls back to it.
"""
import contextlib
import os
import random
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .cli import UserError

__all__ = ['save_checkpoint', 'load_checkpoint', 'find_checkpoint', 'save_weights', 'save_model_folder',
           'rng_state', 'set_rng_state', 'replace_dir', 'write_text']

MODEL_FILE = 'model.safetensors'
EMA_FILE = 'model_ema.safetensors'
STATE_FILE = 'state.pt'


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _plain_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory, as safetensors wants them."""
    return {k: v.detach().to('cpu').contiguous().clone() for k, v in state_dict.items()}


def save_weights(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
    os.close(fd)
    try:
        save_file(_plain_state_dict(state_dict), tmp, metadata={'format': 'pt'})
        os.chmod(tmp, 0o644)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _seal(folder: str) -> None:
    """fsync every file of ``folder`` and the folder itself; ordinary permissions (mkdtemp makes 0700)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        os.chmod(path, 0o644)
        _fsync_file(path)
    os.chmod(folder, 0o755)
    _fsync_dir(folder)


def replace_dir(tmp: str, dst: str) -> None:
    """Swap the complete folder ``tmp`` in as ``dst`` (``dst`` -> ``dst.prev`` -> removed)."""
    prev = dst + '.prev'
    if os.path.isdir(prev):
        shutil.rmtree(prev)
    if os.path.isdir(dst):
        os.rename(dst, prev)
    os.rename(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if os.path.isdir(prev):
        shutil.rmtree(prev)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU / CUDA, numpy, random) as plain containers."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'name': str(np_state[0]), 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'random': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    r = state['random']
    random.setstate((r[0], tuple(r[1]), r[2]))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(
        folder: str,
        model_state: Dict[str, torch.Tensor],
        state: Dict[str, Any],
        ema_state: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Write ``folder`` (e.g. ``<run>/checkpoints/last``) atomically; returns its path."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(folder) + '.tmp-')
    try:
        save_file(_plain_state_dict(model_state), os.path.join(tmp, MODEL_FILE), metadata={'format': 'pt'})
        if ema_state is not None:
            save_file(_plain_state_dict(ema_state), os.path.join(tmp, EMA_FILE), metadata={'format': 'pt'})
        torch.save(state, os.path.join(tmp, STATE_FILE))
        _seal(tmp)
        replace_dir(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder


def find_checkpoint(path: str) -> str:
    """The checkpoint folder for ``resume=path``: a checkpoint folder itself, or a run folder
    (``<path>/checkpoints/last``). ``UserError`` when there is none."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(full):
        raise UserError(f'resume path does not exist: {path}')
    candidates = [full, os.path.join(full, 'last'), os.path.join(full, 'checkpoints', 'last')]
    candidates += [c + '.prev' for c in candidates[1:]]
    for c in candidates:
        if os.path.isfile(os.path.join(c, STATE_FILE)) and os.path.isfile(os.path.join(c, MODEL_FILE)):
            return c
    raise UserError(f'no checkpoint under {path} (looked for {STATE_FILE} and {MODEL_FILE} in it, in '
                    f'last/ and in checkpoints/last/)')


def load_checkpoint(folder: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]], Dict[str, Any]]:
    """(model weights, EMA weights or None, state) of a checkpoint folder; state with weights_only=True."""
    model_state = load_file(os.path.join(folder, MODEL_FILE))
    ema_path = os.path.join(folder, EMA_FILE)
    ema_state = load_file(ema_path) if os.path.isfile(ema_path) else None
    state = torch.load(os.path.join(folder, STATE_FILE), map_location='cpu', weights_only=True)
    return model_state, ema_state, state


def save_model_folder(model: torch.nn.Module, folder: str, model_args: Optional[dict] = None) -> str:
    """timm's ``save_for_hf`` (config.json with architecture, model_args and pretrained_cfg, plus
    model.safetensors) into ``folder``, atomically; ``timm.create_model('local-dir:<folder>',
    pretrained=True)`` rebuilds the model."""
    from timm.models import save_for_hf
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(folder) + '.tmp-')
    try:
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True)
        _seal(tmp)
        replace_dir(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder


def gather_rng_states(accelerator) -> List[Dict[str, Any]]:
    """Every process's RNG state, in process order (only the main process's list is meaningful)."""
    mine = rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object
    return list(gather_object([mine]))
