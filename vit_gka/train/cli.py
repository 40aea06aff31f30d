"""Command-line entry helpers shared by train.py and eval.py: user mistakes end in one line, not a traceback.

Two kinds of mistakes are caught:

* in the command line itself (unknown config group option such as ``model=gkaa``, a misspelt key such as
  ``epoch=3``, a malformed override): ``check_overrides`` composes the configuration once before
  ``@hydra.main`` runs, for every value of every sweep, and reports the first problem;
* in the values (data root that does not exist, resume path that does not exist, unknown timm model
  name): the task raises ``UserError`` and ``exit_on_user_error`` turns it into one line.

Both print ``error: <message>`` to stderr and exit with status 2 (3 for a run stopped by a non-finite loss,
see faults.py). Hydra's own reporting of these cases spans several lines plus a hint about
``HYDRA_FULL_ERROR``; real bugs still raise normally. Only the main process of a distributed run prints.

A mistake leaves existing folders as they were: before Hydra runs, ``check_overrides`` remembers what Hydra
itself writes into an existing output folder (``.hydra/``, the job log); when the task then fails with an
input ``UserError``, those are put back (a folder Hydra created for the failed job is removed).

Usage::

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    @exit_on_user_error
    def main(cfg): ...

    if __name__ == "__main__":
        check_overrides(CONF_DIR, "config", validate=validate)  # validate(cfg): value checks, optional
        main()
"""
import contextlib
import difflib
import functools
import os
import shutil
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from vit_gka.errors import EXIT_USER_ERROR, UserError, fail

__all__ = ['exit_on_user_error', 'check_overrides']

_HYDRA_FILES: Dict[str, Dict[str, Any]] = {}  # output folder -> what Hydra will touch, as it was
_EXISTING: List[str] = []  # the nearest existing ancestor of the output folder, before Hydra ran






def _snapshot(folder: str) -> Dict[str, Any]:
    """What Hydra will touch in an existing output folder: ``.hydra/*`` contents (None: no .hydra/) and the
    sizes of the ``*.log`` files."""
    hydra_dir = os.path.join(folder, '.hydra')
    hydra = None
    if os.path.isdir(hydra_dir):
        hydra = {}
        for name in os.listdir(hydra_dir):
            with open(os.path.join(hydra_dir, name), 'rb') as f:
                hydra[name] = f.read()
    logs = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
            if n.endswith('.log') and os.path.isfile(os.path.join(folder, n))}
    return {'hydra': hydra, 'logs': logs}


def _put_back(folder: str) -> None:
    """Undo what Hydra wrote into ``folder`` for a job that failed on its input."""
    folder = os.path.abspath(folder)
    before = _HYDRA_FILES.get(folder)
    if before is None:  # a folder Hydra made for this job: remove it (and the parents it made) if it holds nothing else
        names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if names and all(n == '.hydra' or n.endswith('.log') for n in names):
            shutil.rmtree(folder, ignore_errors=True)
            parent = os.path.dirname(folder)
            while _EXISTING and parent.startswith(_EXISTING[0] + os.sep) and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)
        return
    hydra_dir = os.path.join(folder, '.hydra')
    if before['hydra'] is None:
        shutil.rmtree(hydra_dir, ignore_errors=True)
    else:
        for name in os.listdir(hydra_dir) if os.path.isdir(hydra_dir) else []:
            if name not in before['hydra']:
                os.remove(os.path.join(hydra_dir, name))
        for name, data in before['hydra'].items():
            path = os.path.join(hydra_dir, name)
            if not os.path.isfile(path) or open(path, 'rb').read() != data:
                with open(path, 'wb') as f:
                    f.write(data)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith('.log') and os.path.isfile(path):
            if name in before['logs']:
                os.truncate(path, before['logs'][name])
            else:
                os.remove(path)


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate a Hydra task so that a ``UserError`` it raises becomes one line and exit status 2 (or the
    error's ``exit_code``), with the output folder put back as it was for an input error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if e.input_error and os.environ.get('RANK', '0') == '0':
                from hydra.core.hydra_config import HydraConfig
                with contextlib.suppress(ValueError, OSError):  # no Hydra context, or nothing to put back
                    _put_back(HydraConfig.get().runtime.output_dir)
            fail(str(e), getattr(e, 'exit_code', EXIT_USER_ERROR))

    return wrapper




def _options(config_dir: str, group: str) -> List[str]:
    folder = os.path.join(config_dir, *group.split('/'))
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith('.yaml'))


def _config_keys(cfg, prefix: str = '') -> Iterable[str]:
    from omegaconf import DictConfig
    for key in cfg.keys():
        name = f'{prefix}{key}'
        yield name
        try:
            value = cfg._get_node(key)
        except Exception:
            continue
        if isinstance(value, DictConfig):
            yield from _config_keys(value, name + '.')


def _hint(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _split_sweeps(overrides: List[str]) -> List[List[str]]:
    """One list of plain overrides per value of each sweep (the other sweeps at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first, choices = [], []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            values = [f'{ov.get_key_element()}={v}' for v in ov.sweep_string_iterator()]
        else:
            values = [text]
        first.append(values[0])
        choices.append(values)
    variants = [first]
    for i, values in enumerate(choices):
        for v in values[1:]:
            variants.append(first[:i] + [v] + first[i + 1:])
    return variants


def check_overrides(config_dir: str, config_name: str, argv: Optional[List[str]] = None,
                    validate: Optional[Callable[[Any], None]] = None) -> None:
    """Compose the configuration with the command line's overrides, before Hydra runs the app.

    Reports an unknown config group option, a key not in the config, a malformed override, a value that
    ``validate(cfg)`` rejects (``UserError``) or an output folder that cannot be written as one line
    (``fail``), and remembers what Hydra will write into an existing output folder (module docstring). Flags
    (``-m``, ``--cfg job``, ...) are left to Hydra; with ``--config-name`` / ``--config-path`` /
    ``--config-dir`` the check is skipped (another config than this one).
    """
    argv = sys.argv[1:] if argv is None else argv
    multirun = any(a in ('-m', '--multirun') for a in argv)
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg.startswith(('--config-name', '--config-path', '--config-dir', '-cn', '-cp', '-cd')):
            return
        if arg in ('--cfg', '-c', '--package', '-p', '--info', '-i', '--experimental-rerun'):
            skip_next = arg not in ('--info', '-i')
            continue
        if arg.startswith('-'):
            continue
        overrides.append(arg)

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        variants = _split_sweeps(overrides)
    except HydraException as e:
        fail(f'cannot parse the command line: {str(e).splitlines()[0]}')
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base='1.3'):
            base = compose(config_name=config_name)
            known = list(_config_keys(base))
            for variant in variants:
                for ov in variant:
                    key, _, value = ov.partition('=')
                    key = key.lstrip('+~')
                    if '/' in key or key in _group_names(config_dir):
                        group = key.split('@')[0]
                        if key.startswith('hydra/'):
                            continue
                        if value not in ('null', '') and value not in _options(config_dir, group):
                            name = {'model': 'model', 'data': 'data set', 'recipe': 'recipe'}.get(group, group)
                            fail(f"unknown {name} '{value}'{_hint(value, _options(config_dir, group))}; "
                                 f"choose one of: {', '.join(_options(config_dir, group))}")
                try:
                    cfg = compose(config_name=config_name, overrides=variant, return_hydra_config=True)
                except MissingConfigException as e:
                    message = str(e).splitlines()[0]
                    if 'submitit' in message:
                        message += ' (the Slurm launcher needs: pip install hydra-submitit-launcher)'
                    fail(message)
                except (HydraException, OmegaConfBaseException) as e:
                    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                    message = lines[0] if lines else type(e).__name__
                    bad = next((ov for ov in variant if ov.partition('=')[0].lstrip('+~') in message), None)
                    hint = ''
                    if bad is not None and 'override' in message:
                        hint = _hint(bad.partition('=')[0].lstrip('+~'), known)
                        if not hint and len(lines) > 1:
                            hint = f' ({lines[-1]})' if 'full_key' not in lines[-1] else f' ({lines[1]})'
                    fail(f'{message}{hint}')
                _check_values(cfg, multirun, validate)
    finally:
        GlobalHydra.instance().clear()


def _check_values(cfg, multirun: bool, validate: Optional[Callable[[Any], None]]) -> None:
    """``validate`` and the output folder of one composed configuration (with its ``hydra`` node)."""
    from omegaconf import OmegaConf

    from vit_gka.train.validation import check_output_dir
    key = 'hydra.sweep.dir' if multirun else 'hydra.run.dir'
    raw = str(OmegaConf.to_container(cfg.hydra.sweep if multirun else cfg.hydra.run, resolve=False)['dir'])
    try:
        if validate is not None:
            validate(cfg)
        _EXISTING[:] = [check_output_dir(raw.split('${')[0] or '.', key)]
    except UserError as e:
        fail(str(e))
    folder = os.path.abspath(os.path.expanduser(raw))
    if not multirun and '${' not in raw and os.path.isdir(folder):
        _HYDRA_FILES[folder] = _snapshot(folder)


def _group_names(config_dir: str) -> List[str]:
    return sorted(d for d in os.listdir(config_dir)
                  if os.path.isdir(os.path.join(config_dir, d)) and not d.startswith(('.', '_')))
