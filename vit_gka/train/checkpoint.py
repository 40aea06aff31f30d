"""Files and folders that are never half-written: checkpoint folders, weight files, text files, the model folder.

What a checkpoint folder holds is defined in state.py (``TrainState``); this module writes it
(``write_checkpoint``) and loading.py / state.py read it.

Writing a folder: it is filled as ``last.tmp-*`` beside it, every file and the folder fsync'ed, then swapped in
by renames (a directory rename is atomic; a non-empty one cannot be replaced in one rename): the old ``last``
becomes ``last.prev``, the new one becomes ``last``, then ``last.prev`` is renamed to ``last.trash-*`` and
removed. At every instant ``last`` or, between the two renames, ``last.prev`` is a complete checkpoint;
``state.find_checkpoint`` takes ``last`` and falls back to ``last.prev``. Leftovers of a killed write
(``last.tmp-*``, ``last.trash-*``) never carry a name that is read, and the next write removes them.

Test hook: ``VIT_GKA_TEST_PAUSE_IN_CHECKPOINT=<write|swap>[@n]`` makes the n-th (default 2nd: the first that
replaces one) ``write_checkpoint`` of the process sleep, either after ``model.safetensors`` is written into the
temporary folder (``write``) or between the two renames (``swap``), so that a test can ``kill -9`` it there.
"""
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save_file

__all__ = ['write_checkpoint', 'save_weights', 'save_model_folder', 'replace_dir', 'write_text',
           'MODEL_FILE', 'EMA_FILE', 'STATE_FILE', 'PAUSE_ENV']

MODEL_FILE = 'model.safetensors'
EMA_FILE = 'model_ema.safetensors'
STATE_FILE = 'state.pt'
PAUSE_ENV = 'VIT_GKA_TEST_PAUSE_IN_CHECKPOINT'
_saved = 0  # write_checkpoint calls of this process (for the test pause)


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


def _test_pause(stage: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        where, _, nth = spec.partition('@')
        if where == stage and _saved == int(nth or 2):
            time.sleep(600)


def _plain_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory, as safetensors wants them."""
    return {k: v.detach().to('cpu').contiguous().clone() for k, v in state_dict.items()}


@contextlib.contextmanager
def _atomic_file(path: str):
    """Yield a temporary path beside ``path``; when the block ends, fsync it and rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write a safetensors file atomically."""
    with _atomic_file(path) as tmp:
        save_file(_plain_state_dict(state_dict), tmp, metadata={'format': 'pt'})


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    with _atomic_file(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def _discard(path: str) -> None:
    """Remove a folder without a partly deleted copy ever carrying its name."""
    trash = f'{path.rsplit(".prev", 1)[0]}.trash-{uuid.uuid4().hex[:8]}'
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: str, dst: str) -> None:
    """Swap the complete folder ``tmp`` in as ``dst``; ``dst`` or ``dst.prev`` is complete at every instant."""
    prev = dst + '.prev'
    if os.path.isdir(dst):
        if os.path.isdir(prev):
            _discard(prev)
        os.rename(dst, prev)
        _test_pause('swap')
    # else: a ``prev`` left by a crash between the renames is the only complete copy: keep it until dst exists
    os.rename(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if os.path.isdir(prev):
        _discard(prev)


@contextlib.contextmanager
def _atomic_dir(folder: str):
    """Yield a temporary folder beside ``folder``; when the block ends, seal it and swap it in."""
    parent, base = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):  # leftovers of a write that was killed
        if name.startswith((base + '.tmp-', base + '.trash-')):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=base + '.tmp-')
    try:
        yield tmp
        for name in os.listdir(tmp):  # fsync every file, ordinary permissions (mkdtemp makes 0700)
            os.chmod(os.path.join(tmp, name), 0o644)
            _fsync_file(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        replace_dir(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def write_checkpoint(
        folder: str,
        model_state: Dict[str, torch.Tensor],
        record: Dict[str, Any],
        ema_state: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Write the checkpoint folder ``folder`` (e.g. ``<run>/checkpoints/last``) atomically: the weights, the EMA
    weights and ``record`` as state.pt (``TrainState.record``); returns its path."""
    global _saved
    _saved += 1
    with _atomic_dir(folder) as tmp:
        save_file(_plain_state_dict(model_state), os.path.join(tmp, MODEL_FILE), metadata={'format': 'pt'})
        _test_pause('write')
        if ema_state is not None:
            save_file(_plain_state_dict(ema_state), os.path.join(tmp, EMA_FILE), metadata={'format': 'pt'})
        torch.save(record, os.path.join(tmp, STATE_FILE))
    return folder


def save_model_folder(model: torch.nn.Module, folder: str, model_args: Optional[dict] = None,
                      label_names: Optional[list] = None) -> str:
    """timm's ``save_for_hf`` (config.json with architecture, model_args, label names and pretrained_cfg, plus
    model.safetensors) into ``folder``, atomically; ``timm.create_model('local-dir:<folder>',
    pretrained=True)`` rebuilds the model. ``model_args``: the ``create_model`` arguments that rebuild it (timm
    1.0.31 records them by itself, 1.0.23-1.0.30 only write what is given here)."""
    from timm.models import save_for_hf
    with _atomic_dir(folder) as tmp:
        save_for_hf(model, tmp, model_config={'label_names': list(label_names)} if label_names else None,
                    model_args=model_args, safe_serialization=True)
    return folder
