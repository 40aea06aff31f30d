"""Reading checkpoints and weights safely, checking them against a model, and resuming a run (``resume=``).

``load_checkpoint`` (a training checkpoint folder, see checkpoint.py for its layout) and ``load_weights`` (one
weights file) are the only readers. Weights come from safetensors (or, for a foreign ``.pth``, through
``torch.load(weights_only=True)``), the training state through ``torch.load(weights_only=True)``: a pickle
that would import anything but tensors and plain containers is refused before any of it runs.
``check_weights`` compares weights with a model (architecture, classes, shapes) before anything is copied, so
a mismatch never leaves a half-loaded model; ``describe_load_error`` names the first mismatch of a strict
``load_state_dict`` that failed (eval.py's load through timm). Every failure is a one-line ``UserError``.

``restore_training`` puts a checkpoint back into the model, EMA, optimizer, scheduler and RNGs;
``gather_process_states`` collects every process's RNG state (and partial epoch sums) for the next checkpoint.
"""
import logging
import os
import pickle
import random
import re
import warnings
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from vit_gka.train.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE
from vit_gka.errors import UserError

log = logging.getLogger('vit_gka.train')

__all__ = ['Checkpoint', 'load_checkpoint', 'find_checkpoint', 'load_weights', 'load_state', 'check_weights',
           'describe_load_error', 'restore_training', 'rng_state', 'set_rng_state', 'gather_process_states',
           'run_dir_of']

STATE_KEYS = ('epoch', 'num_updates', 'optimizer', 'scheduler', 'rng', 'model_name', 'model_args')


class Checkpoint(NamedTuple):
    folder: str
    model: Dict[str, torch.Tensor]
    ema: Optional[Dict[str, torch.Tensor]]
    state: Dict[str, Any]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def find_checkpoint(path: str) -> str:
    """The checkpoint folder for ``resume=path``: a checkpoint folder itself, or a run folder
    (``<path>/checkpoints/last``), or their ``.prev`` left by a crash between two renames."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(full) and not os.path.isdir(full + '.prev'):
        raise UserError(f'resume path does not exist: {path}; give a run folder or its checkpoints/last')
    candidates = [full, os.path.join(full, 'last'), os.path.join(full, 'checkpoints', 'last')]
    candidates += [c + '.prev' for c in candidates]
    for c in candidates:
        if os.path.isfile(os.path.join(c, STATE_FILE)) and os.path.isfile(os.path.join(c, MODEL_FILE)):
            return c
    raise UserError(f'no checkpoint under {path} (looked for {STATE_FILE} and {MODEL_FILE} in it, in '
                    f'last/ and in checkpoints/last/); give a run folder that has checkpoints/last')


def run_dir_of(folder: str) -> str:
    """The run folder a checkpoint folder belongs to (``<run>/checkpoints/last`` -> ``<run>``)."""
    parent = os.path.dirname(os.path.abspath(folder))
    return os.path.dirname(parent) if os.path.basename(parent) == 'checkpoints' else parent


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
            raise UserError(f'{path} is truncated or not a checkpoint ({_first_line(e)})') from e
        found = re.search(r'Unsupported (?:global: GLOBAL (\S+)|operand (\d+))', str(e))
        what = (f'unpickling it would call {found.group(1)}' if found and found.group(1) else
                f'it is a pickle the safe loader cannot vet (opcode {found.group(2)})' if found else
                'it holds more than tensors and plain containers')
        raise UserError(f'refusing to load {path}: {what}, and unpickling it fully could run code; torch.load('
                        f'weights_only=True) stopped before any of it ran. Only use checkpoints this code wrote or '
                        f'that you trust') from e
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, KeyError, EOFError, ... for bad files)
        raise UserError(f'{path} is truncated or not a checkpoint ({type(e).__name__}: {_first_line(e)}); use '
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
            raise UserError(f'{path} is truncated or not a safetensors file ({_first_line(e)}); use another '
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


def load_checkpoint(path: str) -> Checkpoint:
    """The training checkpoint that ``resume=path`` names (see ``find_checkpoint``): weights, EMA weights or
    None, and the state; ``UserError`` for a missing, truncated, foreign or unsafe one."""
    folder = find_checkpoint(path)
    model = load_weights(os.path.join(folder, MODEL_FILE))
    ema_path = os.path.join(folder, EMA_FILE)
    ema = load_weights(ema_path) if os.path.isfile(ema_path) else None
    state = load_state(os.path.join(folder, STATE_FILE))
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise UserError(f'{os.path.join(folder, STATE_FILE)} is not a vit-gka training state (keys '
                        f'{", ".join(STATE_KEYS)} expected)')
    return Checkpoint(folder, model, ema, state)


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
    return _first_line(e)


def _fresh_state() -> Dict[str, Any]:
    return {'epoch': 0, 'step': 0, 'totals': None, 'num_updates': 0, 'history': [], 'nonfinite_skipped': 0,
            'best': {'top1': -1.0, 'epoch': None, 'ema': False}, 'wall_time_s': 0.0, 'train_time_s': 0.0,
            'train_images': 0}


def restore_training(chk: Optional[Checkpoint], run: Dict[str, Any], model, model_ema, optimizer, scheduler,
                     accelerator) -> Dict[str, Any]:
    """Resume: check ``chk`` against this run (``run``: model_name, model_args, epochs, global_batch_size; then
    the weights' architecture, classes and shapes), load it into the model, EMA, optimizer and scheduler and
    restore this process's RNGs. Returns the bookkeeping to continue with (``_fresh_state``'s keys; ``totals``:
    this process's partial epoch sums of a mid-epoch checkpoint); a fresh run's when ``chk`` is None. Every
    check comes before anything is loaded."""
    if chk is None:
        return _fresh_state()
    state, where = chk.state, f'resume checkpoint {chk.folder}'
    name, args = run['model_name'], run['model_args']
    if state['model_name'] != name or state['model_args'] != args:
        theirs = state['model_args'] if isinstance(state['model_args'], dict) else {}
        diff = [f'{k}={theirs.get(k)!r} there, {args.get(k)!r} here'
                for k in sorted(set(theirs) | set(args)) if theirs.get(k) != args.get(k)]
        raise UserError(f"{where} is a run of {state['model_name']}, this run builds {name}"
                        + (f" ({'; '.join(diff)})" if diff else '')
                        + '; resume with the same model= and model.args, or start a new run')
    if int(state.get('epochs', run['epochs'])) != run['epochs']:
        raise UserError(f"{where} follows a {state.get('epochs')}-epoch schedule; pass epochs={state.get('epochs')} "
                        f"(the schedule cannot be stretched on resume)")
    step = int(state.get('step', 0))
    if step and int(state.get('global_batch_size', 0)) != run['global_batch_size']:
        raise UserError(f"{where} was written mid-epoch with global batch {state.get('global_batch_size')}, this "
                        f"run's is {run['global_batch_size']}; resume with the same batch_size, grad_accum and "
                        f"number of processes")
    check_weights(model, chk.model, where)
    if model_ema is not None:
        if chk.ema is None:
            raise UserError(f'{where} has no EMA weights but ema.enable is true; set ema.enable=false')
        check_weights(model_ema.module, chk.ema, where + ' (EMA)')
    try:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'{where}: its optimizer state does not fit this optim= / sched= ({_first_line(e)}); '
                        f'resume with the recipe it was trained with') from e
    model.load_state_dict(chk.model)
    if model_ema is not None:
        model_ema.module.load_state_dict(chk.ema)
    procs = state.get('procs') or [{'rng': r} for r in state['rng']]
    mine = procs[accelerator.process_index] if len(procs) == accelerator.num_processes else procs[0]
    set_rng_state(mine['rng'])
    log.info('resumed from %s at epoch %d, step %d (after %d updates)', chk.folder, int(state['epoch']) + 1, step,
             int(state['num_updates']))
    out = {k: state.get(k, v) for k, v in _fresh_state().items()}
    out.update(epoch=int(state['epoch']), step=step, num_updates=int(state['num_updates']),
               totals=mine.get('totals') if step else None)
    return out


# --------------------------------------------------------------------------------------------- RNG state

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


def gather_process_states(accelerator, extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every process's RNG state and ``extra`` (partial epoch sums), in process order (``[{'rng': ...,
    **extra}]``; only the main process's list is meaningful). A collective: every process calls it."""
    mine = {'rng': rng_state(), **(extra or {})}
    if accelerator is None or accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object
    return list(gather_object([mine]))
