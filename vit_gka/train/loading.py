"""Reading weights and training states safely, and checking weights against a model.

``load_weights`` (one weights file) and ``load_state`` (a torch file of plain containers, such as a checkpoint's
state.pt) are the only readers. Weights come from safetensors (or, for a foreign ``.pth``, through
``torch.load(weights_only=True)``), the training state through ``torch.load(weights_only=True)``: a pickle
that would import anything but tensors and plain containers is refused before any of it runs.
``load_model_folder`` rebuilds a run's ``model/`` (timm's ``save_for_hf`` layout) from its config.json and
model.safetensors alone, refusing any pickle file there (timm's own ``local-dir:`` loader, before 1.0.31, unpickles
a ``*.bin`` / ``*.pth`` it finds there). ``check_weights`` compares weights with a model (architecture, classes,
shapes) before anything is copied, so a mismatch never leaves a half-loaded model; ``describe_load_error`` names the first mismatch of a strict
``load_state_dict`` that failed (eval.py's load through timm). Every failure is a one-line ``UserError``.
``find_folder`` is the one reading of what a path names (a run folder, its checkpoints/, a checkpoint or model
folder) for ``resume=``, eval.py's ``ckpt=`` and ``finetune=``.
The checkpoint folder, its schema and resuming from it: state.py.
"""
import dataclasses
import json
import os
import pickle
import re
import stat
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file

from vit_gka.errors import UserError
from vit_gka.train.checkpoint import CHECKPOINTS, LAST, MODEL_DIR, MODEL_FILE, PREV

__all__ = ['load_weights', 'load_state', 'check_weights', 'describe_load_error', 'first_line', 'load_model_folder',
           'model_folder_files', 'nonfinite_tensors', 'find_folder', 'last_checkpoint', 'run_dir_of']



def last_checkpoint(run_dir: str) -> str:
    """The checkpoint folder of the run folder ``run_dir``: ``<run>/checkpoints/last``."""
    return os.path.join(run_dir, CHECKPOINTS, LAST)


def run_dir_of(folder: str) -> str:
    """The run folder a checkpoint folder belongs to (``<run>/checkpoints/last`` -> ``<run>``)."""
    parent = os.path.dirname(os.path.abspath(folder))
    return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS else parent


def find_folder(path: str, files: Sequence[str], model: bool = False, prev: bool = False) -> Optional[str]:
    """The first folder ``path`` names that holds every one of ``files``, or None. A checkpoint is looked for in
    ``path`` itself, ``<path>/last`` (a run's checkpoints/) and ``<path>/checkpoints/last`` (a run folder), then,
    with ``prev``, in each one's ``.prev``; a ``model`` folder in ``<path>/model`` (a run folder), then ``path``."""
    if model:
        folders = [os.path.join(path, MODEL_DIR), path]
    else:
        folders = [path, os.path.join(path, LAST), last_checkpoint(path)]
        folders += [f + PREV for f in folders] if prev else []
    return next((f for f in folders if all(os.path.isfile(os.path.join(f, name)) for name in files)), None)


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


# What a model folder may hold besides its weights: text only (timm's save_for_hf writes config.json; the
# publish command adds README.md and config.yaml).
MODEL_FOLDER_TEXT = ('config.json', 'config.yaml', 'README.md', '.gitattributes')
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.ckpt', '.tar', '.npz', '.npy')


def _is_pickle(path: str) -> bool:
    """A file torch.load / pickle would unpickle: a pickle (protocol >= 2) or torch's zip format."""
    try:
        with open(path, 'rb') as f:
            return f.read(4).startswith((b'PK\x03\x04', b'\x80'))
    except OSError:
        return False


def model_folder_files(folder: str) -> List[str]:
    """The files of a model folder (config.json, *.safetensors, text) after checking it holds no pickle: a
    ``UserError`` names the first file that could run code on load, or a file that is no regular file."""
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise UserError(f'{folder} is not a model folder (no config.json); give a training run folder or its model/')
    names = sorted(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise UserError(f'{path} is not a regular file; a model folder holds config.json and model.safetensors '
                            f'only: remove it')
        if name.endswith('.safetensors') or name in MODEL_FOLDER_TEXT:
            continue
        if name.lower().endswith(PICKLE_SUFFIXES) or _is_pickle(path):
            raise UserError(f'refusing to read {folder}: {name} is a pickle, which could run code when loaded; '
                            f'only model.safetensors is read: delete {path} (or use a folder you trust)')
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def load_model_folder(folder: str):
    """The model of a ``save_for_hf`` folder, built by timm from config.json (architecture, ``model_args``,
    pretrained config) with the weights of model.safetensors, read by safetensors and checked against the model
    before they are copied; every failure is one ``UserError`` line. The same model as
    ``timm.create_model('local-dir:<folder>', pretrained=True)``, without ever unpickling."""
    import timm
    from timm.models import PretrainedCfg
    model_folder_files(folder)
    config_file = os.path.join(folder, 'config.json')
    try:
        with open(config_file) as f:
            config = json.load(f)
        name = config['architecture']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'{config_file} is not a timm model config ({type(e).__name__}: {first_line(e)}); '
                        f'export the model again (save_model=true)') from e
    weights_file = os.path.join(folder, MODEL_FILE)
    weights = load_weights(weights_file)
    if not timm.is_model(name):
        raise UserError(f"{config_file}: unknown timm model '{name}' (import the package that registers it)")
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pretrained_cfg = {k: v for k, v in dict(config.get('pretrained_cfg') or {}).items() if k in known}
    for key in ('num_classes', 'label_names', 'label_descriptions'):
        if key in config:
            pretrained_cfg[key] = config[key]
    for key in ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size'):
        if isinstance(pretrained_cfg.get(key), list):  # JSON's lists, as timm's own configs have them: tuples
            pretrained_cfg[key] = tuple(pretrained_cfg[key])
    pretrained_cfg.update(architecture=name, file=weights_file, source='local-dir')
    args = dict(config.get('model_args') or {})
    if 'num_classes' in config:
        args.setdefault('num_classes', config['num_classes'])
    try:
        model = timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f'{config_file}: timm cannot build {name} from it ({type(e).__name__}: {first_line(e)}); '
                        f'export the model again') from e
    check_weights(model, weights, weights_file)
    model.load_state_dict(weights)
    return model


def nonfinite_tensors(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [k for k, v in state_dict.items()
            if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
