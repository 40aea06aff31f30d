"""Files and folders that are never half-written: checkpoint folders, weight files, text files, the model folder.

What a checkpoint folder holds is defined in state.py (``TrainState``); this module writes it
(``write_checkpoint``) and loading.py / state.py read it.

Writing a folder: it is filled as ``last.tmp-*`` beside it, every file and the folder fsync'ed, then swapped in
by renames (a directory rename is atomic; a non-empty one cannot be replaced in one rename): the old ``last``
becomes ``last.prev``, the new one becomes ``last``, then ``last.prev`` is renamed to ``last.trash-*`` and
removed. At every instant ``last`` or, between the two renames, ``last.prev`` is a complete checkpoint;
``state.find_checkpoint`` takes ``last`` and falls back to ``last.prev``. Leftovers of a killed write
(``last.tmp-*``, ``last.trash-*``) never carry a name that is read, and the next write removes them.

A full disk or an I/O error while a checkpoint is written (torch's and safetensors' writers raise RuntimeError and
SafetensorError for it, not OSError) ends in ``CheckpointWriteError``: one line naming the checkpoint that failed,
why, and the last good one, which is left as it was (exit status 74, EX_IOERR of sysexits.h); the temporary
folder is removed. Every other file of a run and of the tools is written by ``write_text`` / ``save_weights`` /
``atomic_dir`` too: a failure leaves the old file (or none), never a half-written one, and ends in ``WriteError``,
one line, exit 74.

The tests' faults in these writes (a pause mid-write, ENOSPC) are faults.py's.
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from vit_gka.errors import UserError
from vit_gka.train.faults import fail_checkpoint, pause_in_checkpoint, test_fail_write

__all__ = ['write_checkpoint', 'save_weights', 'save_model_folder', 'replace_dir', 'write_text', 'atomic_dir',
           'CheckpointWriteError', 'WriteError', 'write_failed', 'CHECKPOINTS', 'LAST', 'PREV', 'MODEL_DIR', 'BEST_FILE',
           'MODEL_FILE', 'EMA_FILE', 'STATE_FILE',
           'EXIT_IO_ERROR']

# A run folder's names, written here and read by loading.py: <run>/checkpoints/last/ (MODEL_FILE, EMA_FILE,
# STATE_FILE), the .prev a crash between the two renames of a checkpoint write leaves beside it, <run>/model/ (timm's
# save_for_hf folder, its weights in MODEL_FILE too) and <run>/best.safetensors.
CHECKPOINTS = 'checkpoints'
LAST = 'last'
PREV = '.prev'
MODEL_DIR = 'model'
BEST_FILE = 'best.safetensors'
MODEL_FILE = 'model.safetensors'
EMA_FILE = 'model_ema.safetensors'
STATE_FILE = 'state.pt'
EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR
_saved = 0  # write_checkpoint calls of this process: the n of faults.py's checkpoint faults


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


class WriteError(UserError):
    """A file or folder could not be written (full disk, read-only disk, I/O error); what was there before is left
    as it was (exit status 74)."""
    exit_code = EXIT_IO_ERROR
    input_error = False


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (full disk, I/O error); the last good one is left as it was."""


def write_failed(path: str, error: BaseException, then: str) -> WriteError:
    """The one-line error of a failed write: what, why (the OS's words), and ``then`` (what to do)."""
    return WriteError(f'cannot write {path}: {_reason(error, os.path.dirname(os.path.abspath(path)))}; {then}')


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_FILE)) and os.path.isfile(os.path.join(folder, MODEL_FILE))


def _reason(error: BaseException, folder: str) -> str:
    """Why a write failed, in words: the OS error, else the one a writer's message names, else a full disk."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    text = str(error)
    code = re.search(r'os error (\d+)', text)
    if code:
        why = os.strerror(int(code.group(1)))
    else:
        try:
            stat = os.statvfs(folder)
            full = stat.f_bavail * stat.f_frsize < (1 << 20)
        except OSError:
            full = False
        why = os.strerror(errno.ENOSPC) if full else (text.strip().splitlines() or [type(error).__name__])[0]
    return why[:1].lower() + why[1:]


def _write_failed(folder: str, error: BaseException, previous: Optional[str]) -> CheckpointWriteError:
    """The one-line error of a failed checkpoint write: what failed, why, and the last good checkpoint."""
    good = next((f for f in (folder, folder + PREV) if _complete(f)), None)
    message = f'cannot write checkpoint {folder}: {_reason(error, os.path.dirname(folder))}; '
    if good is None:
        return CheckpointWriteError(message + 'no checkpoint was written before it; make room (or fix the disk) and '
                                              'start again')
    parent = os.path.dirname(good)
    run = os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS else parent
    return CheckpointWriteError(message + f'the last good checkpoint is {good}' + (f' ({previous})' if previous else '')
                                + f', left as it was; make room (or fix the disk), then continue with resume={run} '
                                  f'hydra.run.dir={run}')


def _save_file(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """safetensors' save_file, its write errors as OSError."""
    try:
        save_file(_plain_state_dict(state_dict), path, metadata={'format': 'pt'})
    except SafetensorError as e:
        raise OSError(errno.EIO, _reason(e, os.path.dirname(path)), path) from e


def _torch_save(obj: Any, path: str) -> None:
    """torch.save, its write errors (RuntimeError from the zip writer: "unexpected pos ...") as OSError; the file
    is closed either way (a failed write must not hold the space of a deleted file)."""
    try:
        with open(path, 'wb') as f:
            torch.save(obj, f)
    except RuntimeError as e:
        raise OSError(errno.EIO, _reason(e, os.path.dirname(path)), path) from e


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
        test_fail_write(path)
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
        _save_file(state_dict, tmp)


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    with _atomic_file(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def _discard(path: str) -> None:
    """Remove a folder without a partly deleted copy ever carrying its name."""
    trash = f'{path.rsplit(PREV, 1)[0]}.trash-{uuid.uuid4().hex[:8]}'
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: str, dst: str) -> None:
    """Swap the complete folder ``tmp`` in as ``dst``; ``dst`` or ``dst.prev`` is complete at every instant."""
    prev = dst + '.prev'
    if os.path.isdir(dst):
        if os.path.isdir(prev):
            _discard(prev)
        os.rename(dst, prev)
        pause_in_checkpoint('swap', _saved)
    # else: a ``prev`` left by a crash between the renames is the only complete copy: keep it until dst exists
    os.rename(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if os.path.isdir(prev):
        _discard(prev)


@contextlib.contextmanager
def atomic_dir(folder: str):
    """Yield a temporary folder beside ``folder``; when the block ends, seal it and swap it in."""
    parent, base = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):  # leftovers of a write that was killed
        if name.startswith((base + '.tmp-', base + '.trash-')):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=base + '.tmp-')
    try:
        yield tmp
        test_fail_write(folder)
        for name in os.listdir(tmp):  # fsync every file, ordinary permissions (mkdtemp makes 0700)
            os.chmod(os.path.join(tmp, name), 0o644)
            _fsync_file(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        replace_dir(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # (after a failed write: never hide its error)


def write_checkpoint(
        folder: str,
        model_state: Dict[str, torch.Tensor],
        record: Dict[str, Any],
        ema_state: Optional[Dict[str, torch.Tensor]] = None,
        previous: Optional[str] = None,
) -> str:
    """Write the checkpoint folder ``folder`` (e.g. ``<run>/checkpoints/last``) atomically: the weights, the EMA
    weights and ``record`` as state.pt (``TrainState.record``); returns its path. A failed write raises
    ``CheckpointWriteError`` (``previous``: what the last good checkpoint is, e.g. ``update 40``, for its message)."""
    global _saved
    _saved += 1
    try:
        with atomic_dir(folder) as tmp:
            _save_file(model_state, os.path.join(tmp, MODEL_FILE))
            pause_in_checkpoint('write', _saved)
            fail_checkpoint(os.path.join(tmp, EMA_FILE if ema_state is not None else STATE_FILE), _saved)
            if ema_state is not None:
                _save_file(ema_state, os.path.join(tmp, EMA_FILE))
            _torch_save(record, os.path.join(tmp, STATE_FILE))
    except OSError as e:
        raise _write_failed(os.path.abspath(folder), e, previous) from e
    return folder


def save_model_folder(model: torch.nn.Module, folder: str, model_args: Optional[dict] = None,
                      label_names: Optional[list] = None) -> str:
    """timm's ``save_for_hf`` (config.json with architecture, model_args, label names and pretrained_cfg, plus
    model.safetensors) into ``folder``, atomically; ``timm.create_model('local-dir:<folder>',
    pretrained=True)`` rebuilds the model. ``model_args``: the ``create_model`` arguments that rebuild it (timm
    1.0.31 records them by itself, 1.0.23-1.0.30 only write what is given here)."""
    from timm.models import save_for_hf
    with atomic_dir(folder) as tmp:
        save_for_hf(model, tmp, model_config={'label_names': list(label_names)} if label_names else None,
                    model_args=model_args, safe_serialization=True)
        pause_in_checkpoint('model', _saved)
    return folder
