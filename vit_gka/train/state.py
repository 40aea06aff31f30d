"""What a run is made of (``TrainParts``) and what it has done (``TrainState``): the checkpoint schema, once.

Checkpoint folder (``<run>/checkpoints/last/``)::

    model.safetensors      raw model weights (timm key names; loads with
                           timm.create_model(name, pretrained=True,
                                             pretrained_cfg_overlay=dict(file=..., num_classes=N)))
    model_ema.safetensors  EMA weights, when the recipe keeps an EMA
    state.pt               TrainState's fields (below) and, beside them, ``optimizer``, ``scheduler`` (their
                           state dicts), ``ema`` (decay, warm-up and update count, for the record), ``procs``
                           (every process's RNG states and partial epoch sums) and ``rng`` (the RNG states
                           alone, as older readers expect them); plain containers only:
                           torch.load(path, weights_only=True) loads it

``save_checkpoint`` writes it through checkpoint.py's crash-safe swap (``last.tmp-*``, ``last.prev``);
``load_checkpoint`` (``resume_checkpoint`` for the ``resume`` setting, ``auto`` included) finds and reads it through
loading.py's safe readers (a checkpoint written before this module, with fewer fields, loads with the defaults
below); ``resume`` checks it against this run and puts it back into the model, EMA, optimizer, scheduler and RNGs.
"""
import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch

from vit_gka.errors import NonFiniteError, UserError
from vit_gka.train.checkpoint import CheckpointWriteError, write_checkpoint
from vit_gka.train.checkpoint import CHECKPOINTS, EMA_FILE, MODEL_FILE, PREV, STATE_FILE
from vit_gka.train.loading import (check_weights, find_folder, first_line, last_checkpoint, load_state, load_weights,
                                   nonfinite_tensors, run_dir_of)

log = logging.getLogger('vit_gka.train')

__all__ = ['TrainParts', 'TrainState', 'Checkpoint', 'save_checkpoint', 'load_checkpoint', 'find_checkpoint',
           'resume_checkpoint', 'RESUME_AUTO', 'resume', 'run_dir_of', 'require_finite', 'rng_state', 'set_rng_state',
           'gather_process_states']

_LOCAL = {'local': True}  # a field of this process only: not a top-level key of state.pt


@dataclass
class TrainParts:
    """The live objects of one run (built by job.py) and the loop's settings: what ``loop.train_one_epoch``
    trains, what checkpoints and results are written from."""
    accelerator: Any
    model: torch.nn.Module          # what runs forward and backward: Accelerate's wrapping of the (compiled) model
    raw_model: torch.nn.Module      # the plain timm model (the same parameters): saved, EMA'd, measured
    model_ema: Any                  # timm's ModelEmaV3 of raw_model, or None
    optimizer: Any
    lr_scheduler: Any               # timm scheduler, stepped per optimizer update (step_update)
    loss_fn: Callable
    mixup_fn: Optional[Callable]
    train_loader: Any
    eval_loader: Any
    clip_grad: Optional[float]      # gradient norm clipping (None: none)
    nonfinite: str                  # stop | skip (nonfinite.UpdateGuard)
    log_interval: int               # updates between progress-bar / TensorBoard train updates
    progress: bool                  # a tqdm bar (main process); else a log line every log_interval updates
    stop: Any = None                # preemption.StopSignals: a stop signal is checked at every update (None: none)


def _no_best() -> Dict[str, Any]:
    return {'top1': -1.0, 'epoch': None, 'ema': False}


@dataclass
class TrainState:
    """Everything ``state.pt`` holds besides optimizer, scheduler and RNG states (see the module docstring)."""
    # The run it belongs to: a resume must build the same model, follow the same schedule and, mid-epoch, use
    # the same global batch (None: not recorded by an older checkpoint).
    model_name: str
    model_args: Dict[str, Any]
    epochs: Optional[int] = None
    global_batch_size: Optional[int] = None
    seed: Optional[int] = None
    data: Optional[str] = None          # data.name: a resume onto another data set would mix two trainings
    train_subset: Optional[int] = None  # the training images used (None: all)
    # Where it is: ``epoch`` epochs done, then ``step`` micro-batches of the next one (a mid-epoch checkpoint),
    # ``num_updates`` optimizer updates in all.
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    # What it has done: the best test top-1 (raw or EMA, and when), one record per epoch, skipped updates,
    # wall time (before this process started; saved up to the checkpoint), training time and images.
    best: Dict[str, Any] = field(default_factory=_no_best)
    history: List[Dict[str, Any]] = field(default_factory=list)
    nonfinite_skipped: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    train_images: int = 0
    train_data_wait_s: float = 0.0  # of train_time_s, waiting for the loader (the processes' mean)
    # This process's partial sums of the current epoch (loss_sum, images, skipped, time_s, data_wait_s) in a mid-epoch
    # checkpoint, saved per process in ``procs``; and when this process's share of the run began.
    totals: Optional[Dict[str, float]] = field(default=None, metadata=_LOCAL)
    started: float = field(default_factory=time.time, metadata=_LOCAL)

    def wall_time(self) -> float:
        """Wall time of the whole run so far, earlier (resumed) processes included."""
        return self.wall_time_s + time.time() - self.started

    def end_epoch(self, stats: Dict[str, Any]) -> None:
        """The epoch ``self.epoch`` is done (``stats``: what ``loop.train_one_epoch`` returned)."""
        self.epoch += 1
        self.step, self.totals = 0, None
        self.nonfinite_skipped += stats['skipped']  # the epoch's, including those before a mid-epoch resume
        self.train_time_s += stats['time_s']
        self.train_images += stats['images']
        self.train_data_wait_s += stats['data_wait_s']

    def record(self, parts: TrainParts, procs: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The content of state.pt (``procs``: ``gather_process_states``)."""
        ema = parts.model_ema
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get('local')}
        out['format'] = FORMAT
        out['wall_time_s'] = self.wall_time()
        out.update(
            optimizer=parts.optimizer.state_dict(), scheduler=parts.lr_scheduler.state_dict(),
            ema={'decay': float(ema.decay), 'warmup': bool(ema.use_warmup), 'num_updates': self.num_updates}
            if ema is not None else None,
            rng=[p['rng'] for p in procs], procs=procs)
        return out

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> 'TrainState':
        """The state of a state.pt's content (``totals`` and ``started`` are this process's: see ``resume``)."""
        saved = {f.name for f in dataclasses.fields(cls) if not f.metadata.get('local')}
        state = cls(**{k: v for k, v in record.items() if k in saved})
        state.epoch, state.step, state.num_updates = int(state.epoch), int(state.step), int(state.num_updates)
        if min(state.epoch, state.step, state.num_updates) < 0 or not isinstance(state.model_args, dict) or \
                not isinstance(state.best, dict) or not isinstance(state.history, list):
            raise ValueError('a field out of its range or of another type')
        return state


# The keys without which a state.pt is no vit-gka training state.
REQUIRED = ('epoch', 'num_updates', 'optimizer', 'scheduler', 'rng', 'model_name', 'model_args')
# state.pt's format: 2 records it (and data, train_subset); a state.pt without one is of format 1, read with the
# defaults of the fields it lacks; a newer one is refused rather than misread.
FORMAT = 2


class Checkpoint(NamedTuple):
    folder: str
    model: Dict[str, torch.Tensor]
    ema: Optional[Dict[str, torch.Tensor]]
    state: TrainState
    record: Dict[str, Any]  # state.pt as loaded (optimizer, scheduler, procs, ...)


def require_finite(weights: Dict[str, torch.Tensor], what: str, update: int) -> None:
    """``NonFiniteError`` when a floating-point tensor of ``weights`` holds a NaN or an infinity: nothing is
    written from weights that would poison every run resumed or evaluated from them."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise NonFiniteError(f'non-finite {what} after update {update} ({len(bad)} tensors, e.g. {bad[0]}); '
                             f'nothing written from them')


def save_checkpoint(folder: str, state: TrainState, parts: TrainParts, previous: Optional[str] = None) -> None:
    """Write ``folder`` (``<run>/checkpoints/last``) atomically from the main process. A collective: every process
    calls it (their RNG states and partial epoch sums go into it), and every process raises the main process's
    ``CheckpointWriteError`` (``previous``: the last good checkpoint, e.g. ``update 40``, for its message).
    Weights or EMA weights that are not finite raise ``NonFiniteError`` on every process (they hold the same
    weights) before anything is written: a checkpoint is always one that resumes."""
    accelerator = parts.accelerator
    require_finite(parts.raw_model.state_dict(), 'weights', state.num_updates)
    if parts.model_ema is not None:
        require_finite(parts.model_ema.module.state_dict(), 'EMA weights', state.num_updates)
    procs = gather_process_states(accelerator, {'totals': state.totals})
    failed = None
    if accelerator.is_main_process:
        ema = parts.model_ema
        try:
            write_checkpoint(folder, parts.raw_model.state_dict(), state.record(parts, procs),
                             ema.module.state_dict() if ema is not None else None, previous=previous)
        except CheckpointWriteError as e:
            if accelerator.num_processes == 1:
                raise
            failed = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        failed = broadcast_object_list([failed], from_process=0)[0]
        if failed:
            raise CheckpointWriteError(failed)


def find_checkpoint(path: str, missing_ok: bool = False) -> Optional[str]:
    """The checkpoint folder for ``resume=path``: a checkpoint folder itself, or a run folder
    (``<path>/checkpoints/last``), or their ``.prev`` left by a crash between two renames. None when there is
    none and ``missing_ok``, else ``UserError``."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(full) and not os.path.isdir(full + PREV):
        if missing_ok:
            return None
        raise UserError(f'resume path does not exist: {path}; give a run folder or its checkpoints/last')
    folder = find_folder(full, (STATE_FILE, MODEL_FILE), prev=True)
    if folder is not None or missing_ok:
        return folder
    raise UserError(f'no checkpoint under {path} (looked for {STATE_FILE} and {MODEL_FILE} in it, in '
                    f'last/ and in checkpoints/last/); give a run folder that has checkpoints/last')


RESUME_AUTO = 'auto'  # resume=auto: this run folder's own checkpoint if it has one, else a fresh start


def resume_checkpoint(resume_from: Optional[str], run_dir: str) -> Optional['Checkpoint']:
    """The checkpoint that the setting ``resume`` names, or None to start fresh: ``resume=<run or checkpoint
    folder>`` (``load_checkpoint``), ``resume=auto`` (``<run_dir>/checkpoints/last`` or its ``.prev`` when there is
    one; a requeued job continues, a first one starts), ``resume=null`` (start)."""
    if resume_from is None or str(resume_from) == '':
        return None
    if str(resume_from) != RESUME_AUTO:
        return load_checkpoint(str(resume_from))
    folder = find_checkpoint(last_checkpoint(run_dir), missing_ok=True)
    if folder is None:
        log.info('resume=auto: no checkpoint in %s yet, starting', os.path.join(run_dir, CHECKPOINTS))
        return None
    return load_checkpoint(folder)


def _uncompiled(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Weights without the ``_orig_mod.`` prefix that checkpoints of compiled runs once carried."""
    prefix = '_orig_mod.'
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def load_checkpoint(path: str) -> Checkpoint:
    """The training checkpoint that ``resume=path`` names (see ``find_checkpoint``); ``UserError`` for a missing,
    truncated, foreign or unsafe one."""
    folder = find_checkpoint(path)
    model = _uncompiled(load_weights(os.path.join(folder, MODEL_FILE)))
    ema_path = os.path.join(folder, EMA_FILE)
    ema = _uncompiled(load_weights(ema_path)) if os.path.isfile(ema_path) else None
    path = os.path.join(folder, STATE_FILE)
    record = load_state(path)
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
        raise UserError(f'{path} is not a vit-gka training state (keys {", ".join(REQUIRED)} expected)')
    version = record.get('format', 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f'{path} is not a vit-gka training state (format {version!r}); use another checkpoint')
    if version > FORMAT:
        raise UserError(f'{path} is of format {version}, written by a newer vit-gka (this one reads up to {FORMAT}); '
                        f'update vit-gka to resume it')
    try:
        state = TrainState.from_record(record)
    except (TypeError, ValueError) as e:
        raise UserError(f'{path} is damaged ({type(e).__name__}: {first_line(e)}); use another checkpoint '
                        f'(checkpoints/last.prev, or a run folder)') from e
    return Checkpoint(folder, model, ema, state, record)


def resume(chk: Checkpoint, this_run: TrainState, parts: TrainParts) -> TrainState:
    """Check ``chk`` against this run (``this_run``: a fresh state; then the weights' architecture, classes and
    shapes), load it into the model, EMA, optimizer and scheduler and restore this process's RNGs. Every check
    comes before anything is loaded. Returns the state to continue with: the checkpoint's progress and
    bookkeeping, this run's identity."""
    saved, where = chk.state, f'resume checkpoint {chk.folder}'
    name, args = this_run.model_name, this_run.model_args
    if saved.model_name != name or saved.model_args != args:
        theirs = saved.model_args if isinstance(saved.model_args, dict) else {}
        diff = [f'{k}={theirs.get(k)!r} there, {args.get(k)!r} here'
                for k in sorted(set(theirs) | set(args)) if theirs.get(k) != args.get(k)]
        raise UserError(f"{where} is a run of {saved.model_name}, this run builds {name}"
                        + (f" ({'; '.join(diff)})" if diff else '')
                        + '; resume with the same model= and model.args, or start a new run')
    if saved.epochs is not None and int(saved.epochs) != this_run.epochs:
        raise UserError(f'{where} follows a {saved.epochs}-epoch schedule; pass epochs={saved.epochs} '
                        f'(the schedule cannot be stretched on resume)')
    for key, what in (('data', 'data'), ('seed', 'seed'), ('train_subset', 'train_subset')):
        theirs, ours = getattr(saved, key), getattr(this_run, key)
        # data and train_subset are recorded since format 2: an older checkpoint is trusted on them
        if theirs != ours and (key == 'seed' and theirs is not None or chk.record.get('format', 1) >= 2):
            raise UserError(f'{where} trained with {what}={theirs}, this run has {what}={ours}; resume with '
                            f'{what}={theirs if theirs is not None else "null"} (a resumed run keeps its data and '
                            f'order), or start a new run')
    if saved.step and saved.global_batch_size != this_run.global_batch_size:
        raise UserError(f'{where} was written mid-epoch with global batch {saved.global_batch_size}, this '
                        f"run's is {this_run.global_batch_size}; resume with the same batch_size, grad_accum and "
                        f'number of processes')
    check_weights(parts.raw_model, chk.model, where)
    if parts.model_ema is not None:
        if chk.ema is None:
            raise UserError(f'{where} has no EMA weights but ema.enable is true; set ema.enable=false')
        check_weights(parts.model_ema.module, chk.ema, where + ' (EMA)')
    try:
        parts.optimizer.load_state_dict(chk.record['optimizer'])
        parts.lr_scheduler.load_state_dict(chk.record['scheduler'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'{where}: its optimizer state does not fit this optim= / sched= ({first_line(e)}); '
                        f'resume with the recipe it was trained with') from e
    parts.raw_model.load_state_dict(chk.model)
    if parts.model_ema is not None:
        parts.model_ema.module.load_state_dict(chk.ema)
    accelerator = parts.accelerator
    try:
        procs = chk.record.get('procs') or [{'rng': r} for r in chk.record['rng']]
        mine = procs[accelerator.process_index] if len(procs) == accelerator.num_processes else procs[0]
        set_rng_state(mine['rng'])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise UserError(f'{where}: its RNG states are damaged ({type(e).__name__}: {first_line(e)}); use another '
                        f'checkpoint (checkpoints/last.prev, or a run folder)') from e
    log.info('resumed from %s at epoch %d, step %d (after %d updates)', chk.folder, saved.epoch + 1, saved.step,
             saved.num_updates)
    return dataclasses.replace(
        saved, model_name=name, model_args=args, epochs=this_run.epochs, seed=this_run.seed, data=this_run.data,
        train_subset=this_run.train_subset,
        global_batch_size=this_run.global_batch_size, totals=mine.get('totals') if saved.step else None,
        started=this_run.started)


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
