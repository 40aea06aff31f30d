"""Command-line entry helpers shared by train.py and eval.py: user mistakes end in one line, not a traceback.

Two kinds of mistakes are caught:

* in the command line itself (unknown config group option such as ``model=gkaa``, a misspelt key such as
  ``epoch=3``, a malformed override): ``check_overrides`` composes the configuration once before
  ``@hydra.main`` runs, for every value of every sweep, and reports the first problem;
* in the values (data root that does not exist, resume path that does not exist, unknown timm model
  name): the task raises ``UserError`` and ``exit_on_user_error`` turns it into one line.

Both print ``error: <message>`` to stderr and exit with status 2. Hydra's own reporting of these cases
spans several lines plus a hint about ``HYDRA_FULL_ERROR``; real bugs still raise normally.

Usage::

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    @exit_on_user_error
    def main(cfg): ...

    if __name__ == "__main__":
        check_overrides(CONF_DIR, "config")
        main()
"""
import difflib
import functools
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence

__all__ = ['UserError', 'fail', 'exit_on_user_error', 'check_overrides', 'require_path']

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for (a name, a path, a value); reported as one line."""


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print ``error: message`` (one line) to stderr and exit with ``code``."""
    line = ' '.join(str(message).split())
    sys.stderr.write(f'error: {line}\n')
    sys.stderr.flush()
    raise SystemExit(code)


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate a Hydra task so that a ``UserError`` it raises becomes one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))

    return wrapper


def require_path(path: Optional[str], what: str) -> str:
    """The absolute path of ``path`` if it exists, else a ``UserError`` naming ``what``."""
    if path is None or str(path) == '':
        raise UserError(f'{what} is not set')
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(full):
        raise UserError(f'{what} does not exist: {path}')
    return full


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


def check_overrides(config_dir: str, config_name: str, argv: Optional[List[str]] = None) -> None:
    """Compose the configuration with the command line's overrides, before Hydra runs the app.

    Reports an unknown config group option, a key not in the config or a malformed override as one line
    (``fail``). Flags (``-m``, ``--cfg job``, ...) are left to Hydra; with ``--config-name`` /
    ``--config-path`` / ``--config-dir`` the check is skipped (another config than this one).
    """
    argv = sys.argv[1:] if argv is None else argv
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
    if not overrides:
        return

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
                    compose(config_name=config_name, overrides=variant, return_hydra_config=True)
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
    finally:
        GlobalHydra.instance().clear()


def _group_names(config_dir: str) -> List[str]:
    return sorted(d for d in os.listdir(config_dir)
                  if os.path.isdir(os.path.join(config_dir, d)) and not d.startswith(('.', '_')))
