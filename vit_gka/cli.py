"""Command-line entry helpers shared by train.py and eval.py: user mistakes end in one line, not a traceback.

Two kinds of mistakes are caught:

* in the command line itself (unknown config group option such as ``model=gkaa``, a misspelt key such
  as ``epoch=3``, a malformed override, a sweep without ``-m``): ``check_overrides`` composes the
  configuration before ``@hydra.main`` runs, for every combination of the config-group sweeps (``glob()``
  expanded) and every value of the other sweeps, and reports the first problem. It only reads the
  overrides: Hydra's flags (``--help``, ``--cfg``, ``--info``, ``-sc install=bash``, ...) and the sweeps it
  cannot enumerate (``interval()``, for a sweeper plugin such as Optuna) are left to Hydra;
* in the values: ``validate(cfg)`` (a number out of range, an unknown timm model, a model family without
  that shape) runs on each composition above; what needs the files (a data root or resume path that does
  not exist, a checkpoint of another model) the task raises as ``UserError``, and ``exit_on_user_error``
  turns it into one line.

Both print ``error: <message>`` to stderr and exit with status 2 (3 for a run stopped by a non-finite loss,
see loop.py). Hydra's own reporting of these cases spans several lines plus a hint about
``HYDRA_FULL_ERROR``; real bugs still raise normally. Only the main process of a distributed run prints.

A mistake leaves existing folders as they were: before Hydra runs, ``check_overrides`` remembers what Hydra
itself writes into an existing output folder (``.hydra/``, the job log); when the task then fails with an
input ``UserError``, those are put back (a folder Hydra created for the failed job is removed).
A ``-m`` sweep onto a sweep folder with a running job (a ``run.lock`` held under it) is refused before Hydra
writes the sweep's ``multirun.yaml`` or a job's ``.hydra/`` (``_check_sweep_free``).

Usage::

    @hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
    @exit_on_user_error
    def main(cfg): ...

    if __name__ == "__main__":
        check_overrides(CONF_DIR, "config", validate=validate)  # validate(cfg): value checks, optional
        main()
"""
import contextlib
import difflib
import functools
import importlib.resources
import itertools
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from vit_gka.errors import EXIT_USER_ERROR, UserError, fail
from vit_gka import hydra_folders as folders

__all__ = ['CONF_DIR', 'CONF_PATH', 'options', 'compose_option', 'exit_on_user_error', 'check_overrides']

# The Hydra configs: the folder conf/ at the top of the repository, installed as the package vit_gka.conf
# (pyproject's package-dir), so a wheel finds them too. Hydra reads them as CONF_PATH, the checks as CONF_DIR.
CONF_PATH = 'pkg://vit_gka.conf'
CONF_DIR = str(importlib.resources.files('vit_gka.conf'))


def options(group: str) -> List[str]:
    """The options of the package's config group ``group`` (``conf/<group>/*.yaml``), sorted: what the checks and
    messages list (a command line's groups, a user's included, are ``ConfigGroups``')."""
    return sorted(f[:-len('.yaml')] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith('.yaml'))


def compose_option(group: str, name: str):
    """The node that ``group=name`` puts at the group's key (``data=folder``: the data node, its defaults list
    followed), composed by Hydra's loader as a job's would be, for code outside a Hydra job; interpolations are
    left unresolved, as in the files. For groups whose options stay at their key (not shape=: ``@package model``)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONF_DIR))
    cfg = loader.load_configuration(f'{group}/{name}', [], RunMode.RUN, from_shell=False)
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.select(cfg, group.replace('/', '.')), resolve=False))


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
                    folders.put_back(HydraConfig.get().runtime.output_dir)
            fail(str(e), getattr(e, 'exit_code', EXIT_USER_ERROR))

    return wrapper


# Hydra flags after which the command line is Hydra's alone: help, printing the config or the defaults list,
# shell completion (``-sc install=bash``: ``install=bash`` is no override), another config.
PASS_THROUGH_FLAGS = ('-h', '--help', '--hydra-help', '--version', '-c', '--cfg', '-p', '--package', '--resolve',
                      '-i', '--info', '-sc', '--shell-completion', '--experimental-rerun',
                      '-cn', '--config-name', '-cp', '--config-path', '-cd', '--config-dir')
# Hydra's plugins by the config name they add (hydra/launcher=joblib, hydra/sweeper=optuna) -> their package
HYDRA_PLUGINS = {'submitit': 'hydra-submitit-launcher', 'slurm': "'vit-gka[slurm]' (hydra-submitit-launcher)",
                 'joblib': 'hydra-joblib-launcher', 'ray': 'hydra-ray-launcher', 'rq': 'hydra-rq-launcher',
                 'optuna': "'vit-gka[sweep]' (hydra-optuna-sweeper)", 'ax': 'hydra-ax-sweeper',
                 'nevergrad': 'hydra-nevergrad-sweeper', 'colorlog': 'hydra-colorlog'}
MAX_COMBINATIONS = 256  # config-group combinations of a sweep composed one by one; beyond, each value once

_GROUP_WORDS = {'model': 'model', 'shape': 'shape', 'data': 'data set', 'recipe': 'recipe', 'experiment': 'experiment'}


class ConfigGroups:
    """The config groups and their options as Hydra's own config loader sees them: the package's
    (``conf/``) and a user's, added with ``hydra.searchpath=[file://my_conf]`` or ``--config-dir``."""

    def __init__(self, config_name: str, searchpath: List[str]):
        from hydra.core.global_hydra import GlobalHydra
        self.loader, self.config_name = GlobalHydra.instance().config_loader(), config_name
        self.overrides = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
        self._cache: Dict[str, List[str]] = {}

    def options(self, group: str) -> List[str]:
        if group not in self._cache:
            from hydra.core.object_type import ObjectType
            self._cache[group] = sorted(self.loader.get_group_options(
                group, ObjectType.CONFIG, config_name=self.config_name, overrides=self.overrides))
        return self._cache[group]

    def names(self) -> List[str]:
        from hydra.core.object_type import ObjectType
        return sorted(g for g in self.loader.get_group_options('', ObjectType.GROUP, config_name=self.config_name,
                                                               overrides=self.overrides)
                      if not g.startswith(('.', '_')) and g != 'hydra')


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


def _override_in(message: str, overrides: Sequence[str]) -> Optional[str]:
    """The override a Hydra / OmegaConf message is about: the one whose key it quotes ('model.args.depth', not
    the 'model' of model=gka), else the one with the longest key it contains; None if none."""
    keys = [(ov.partition('=')[0].lstrip('+~'), ov) for ov in overrides]
    quoted = [ov for key, ov in keys if f"'{key}'" in message]
    inside = sorted(((key, ov) for key, ov in keys if key in message), key=lambda item: -len(item[0]))
    return quoted[0] if quoted else inside[0][1] if inside else None


def _unknown_option(groups: ConfigGroups, group: str, key: str, values: List[str]) -> str:
    """The one-line message for group options that do not exist: a pointer for a timm name or a name of another
    group, else the options and the closest one."""
    options = groups.options(group)
    value = [v for v in values if v not in options and v != 'null'][0]
    if group == 'hydra/callbacks' and value == 'report':
        return ('hydra/callbacks=report is not needed any more: every -m sweep ends with the report '
                '(hydra.callbacks.report.num_images=<n> sets its test images); leave it out')
    what = _GROUP_WORDS.get(group, group)
    others = [g for g in groups.names() if g != group and value in groups.options(g)]
    if others:
        return f"unknown {what} '{value}': it is a {_GROUP_WORDS.get(others[0], others[0])}, give {others[0]}={value}"
    if group == 'model':
        import timm
        if timm.is_model(value):
            return f"unknown model '{value}': for a model of timm's registry give model=timm model.name={value}"
    return f"unknown {what} '{value}'{_hint(value, options)}; choose one of: {', '.join(options)}"


def _flag(arg: str) -> str:
    return arg.split('=', 1)[0] if arg.startswith('--') else arg


CONFIG_DIR_FLAGS = ('-cd', '--config-dir')  # a user's config folder: its groups join the package's


def _split_argv(argv: Sequence[str]) -> Optional[Tuple[bool, List[str], List[str]]]:
    """(multirun, overrides, the folders of --config-dir) of a train.py / eval.py command line, or None when Hydra
    alone handles it."""
    dirs, rest, argv = [], [], list(argv)
    while argv:
        arg = argv.pop(0)
        if _flag(arg) in CONFIG_DIR_FLAGS:
            dirs.append(arg.split('=', 1)[1] if '=' in arg else argv.pop(0) if argv else '')
        else:
            rest.append(arg)
    if any(_flag(a) in PASS_THROUGH_FLAGS for a in rest):
        return None
    return any(a in ('-m', '--multirun') for a in rest), [a for a in rest if not a.startswith('-')], dirs


def _searchpath(overrides: List[str], config_dirs: List[str]) -> List[str]:
    """The user's config folders: those of --config-dir and of a ``hydra.searchpath=[...]`` override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    paths = [f'file://{os.path.abspath(d)}' for d in config_dirs]
    for text in overrides:
        if text.split('=', 1)[0] == 'hydra.searchpath':
            try:
                value = OverridesParser.create().parse_override(text).value()
            except HydraException as e:
                fail(f'cannot parse the command line: {str(e).splitlines()[0]}')
            paths += [str(v) for v in (value if isinstance(value, list) else [value])]
    return paths


def _not_an_option(groups: ConfigGroups, key: str) -> str:
    """The one-line message for a config group that exists but is not in this command's defaults list."""
    if groups.config_name == 'eval':
        return (f'{key}= is a training option, not one of eval.py: eval.py takes the model (and its shape) from '
                f'run=<run dir>, or model_name= with model_args= (its options: python eval.py --help)')
    return f'{key}= is not an option of this command (see --help)'


def _variants(groups: ConfigGroups, overrides: List[str], multirun: bool) -> Tuple[List[List[str]], List[str]]:
    """The plain override lists to compose for this command line: every combination of the config-group
    sweeps (``model=gka,deit shape=fmnist,tiny_fmnist``; ``glob()`` expanded against the group's options), each
    value of every other enumerable sweep once; a sweep that cannot be enumerated (``interval()``, a ``glob()``
    of a value) is left to Hydra and its sweeper (returned second). Unknown group options end here, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        fail(f'cannot parse the command line: {str(e).splitlines()[0]}')
    names = groups.names()
    fixed, group_sweeps, value_sweeps, sampled = [], [], [], []
    for text, ov in zip(overrides, parsed):
        key, group = ov.get_key_element(), ov.key_or_group
        is_group = (group in names or '/' in group) and not ov.is_delete()
        if ov.is_sweep_override() and not multirun:
            fail(f'{text} is a sweep: add -m to run one job per value (a list value: {key}=[a,b]; '
                 f"a string with a comma: {key}='a,b')")
        if not ov.is_sweep_override():
            values, texts = ['null' if ov.value() is None else str(ov.value())], [text]
        elif isinstance(ov.value(), Glob) and is_group:
            values = ov.value().filter(groups.options(group))
            if not values:
                fail(f"{text} matches no {_GROUP_WORDS.get(group, group)}; choose among: "
                     f"{', '.join(groups.options(group))}")
            texts = [f'{key}={v}' for v in values]
        elif ov.is_discrete_sweep() and not isinstance(ov.value(), Glob):
            values = list(ov.sweep_string_iterator())
            texts = [f'{key}={v}' for v in values]
        else:  # interval(), glob() of a value: the sweeper's business
            sampled.append(text)
            continue
        if group == 'hydra/callbacks' and 'report' in values and not groups.options(group):
            fail(_unknown_option(groups, group, key, ['report']))
        if is_group and not group.startswith('hydra/'):
            options = groups.options(group)
            if any(v not in options and v != 'null' for v in values):
                fail(_unknown_option(groups, group, key, values))
        if len(texts) == 1:
            fixed.append(texts[0])
        else:
            (group_sweeps if is_group else value_sweeps).append(texts)
    combos = list(itertools.islice(itertools.product(*group_sweeps), MAX_COMBINATIONS + 1))
    if len(combos) > MAX_COMBINATIONS:  # too many to compose: each value once, the others at their first
        first = [s[0] for s in group_sweeps]
        combos = [tuple(first)] + [tuple(first[:i] + [v] + first[i + 1:])
                                   for i, s in enumerate(group_sweeps) for v in s[1:]]
    variants = [fixed + list(c) + [s[0] for s in value_sweeps] for c in combos]
    for i, sweep in enumerate(value_sweeps):
        for v in sweep[1:]:
            variants.append(fixed + list(combos[0]) + [s[0] for s in value_sweeps[:i]] + [v]
                            + [s[0] for s in value_sweeps[i + 1:]])
    return variants, sampled


def check_overrides(config_dir: str, config_name: str, argv: Optional[List[str]] = None,
                    validate: Optional[Callable[[Any], None]] = None) -> None:
    """Compose the configuration with the command line's overrides, before Hydra runs the app.

    Reports an unknown config group option (with the closest one), a group this command does not take, a key not
    in the config, a malformed override, a sweep without ``-m``, a value that ``validate(cfg)`` rejects
    (``UserError``) or an output folder that cannot be written as one line (``fail``), and remembers what
    Hydra will write into an existing output folder (module docstring). It composes once per composition it
    checks (the plain configuration too only after a mistake, for the hint): each run pays this before Hydra's own. Every composition a ``-m`` sweep
    makes of the config groups is checked (``glob()`` expanded); sweeps it cannot enumerate (``interval()``)
    are left to Hydra's sweeper. A command line with a Hydra flag that does not run the app as configured
    (``--help``, ``--cfg``, ``--info``, ``-sc``, ``--config-name``, ...) is Hydra's alone.
    """
    split = _split_argv(sys.argv[1:] if argv is None else argv)
    if split is None:
        return
    multirun, overrides, config_dirs = split
    _CHECKED_SWEEPS.clear()

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    searchpath = _searchpath(overrides, config_dirs)
    extra = [f"hydra.searchpath=[{','.join(searchpath)}]"] if config_dirs else []  # --config-dir, as Hydra adds it
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base='1.3'):
            groups = ConfigGroups(config_name, searchpath)
            variants, sampled = _variants(groups, overrides, multirun)
            for variant in variants:
                if extra:  # one hydra.searchpath: the --config-dir folders with the user's own
                    variant = extra + [o for o in variant if not o.startswith('hydra.searchpath=')]
                try:
                    cfg = compose(config_name=config_name, overrides=variant, return_hydra_config=True)
                except MissingConfigException as e:
                    message = str(e).splitlines()[0]
                    plugin = next((p for p in HYDRA_PLUGINS if f"/{p}'" in message or f'/{p}_' in message), None)
                    if plugin is not None:
                        message += f' (a Hydra plugin that is not installed: pip install {HYDRA_PLUGINS[plugin]})'
                    fail(message)
                except (HydraException, OmegaConfBaseException) as e:
                    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                    message = lines[0] if lines else type(e).__name__
                    bad = _override_in(message, variant)
                    hint = ''
                    if bad is not None and 'override' in message:
                        key = bad.partition('=')[0].lstrip('+~')
                        if 'No match in the defaults list' in message and key in groups.names():
                            fail(_not_an_option(groups, key))
                        # the keys of the plain configuration, for a hint (composed here: only a mistake pays it)
                        base = compose(config_name=config_name, return_hydra_config=True,
                                       overrides=extra or [o for o in overrides if o.startswith('hydra.searchpath=')])
                        known = [k for k in _config_keys(base) if k != 'hydra' and not k.startswith('hydra.')]
                        hint = _hint(key, [k for k in known if k != key and not key.startswith(k + '.')])
                        if key.startswith('model.args.') and (key in known or not hint):
                            hint = (f' (model.args has only the keys that this shape= sets; a new create_model '
                                    f"argument takes a '+': +{bad.lstrip('+~')})")
                        if not hint and len(lines) > 1:
                            hint = f' ({lines[-1]})' if 'full_key' not in lines[-1] else f' ({lines[1]})'
                    fail(f'{message}{hint}')
                _check_values(cfg, multirun, validate)
                if sampled and cfg.hydra.sweeper.get('_target_', '').endswith('.BasicSweeper'):
                    fail(f"{sampled[0]} needs a sweeper that samples it (pip install '.[sweep]', then add "
                         f"hydra/sweeper=optuna); Hydra's basic sweeper takes lists: {sampled[0].split('=')[0]}=a,b,c")
    finally:
        GlobalHydra.instance().clear()


def _check_values(cfg, multirun: bool, validate: Optional[Callable[[Any], None]]) -> None:
    """``validate`` and the output folder of one composed configuration (with its ``hydra`` node)."""
    from omegaconf import OmegaConf

    key = 'hydra.sweep.dir' if multirun else 'hydra.run.dir'
    raw = str(OmegaConf.to_container(cfg.hydra.sweep if multirun else cfg.hydra.run, resolve=False)['dir'])
    try:
        if validate is not None:
            validate(cfg)
        folders.EXISTING[:] = [folders.check_output_dir(raw.split('${')[0] or '.', key)]
    except UserError as e:
        fail(str(e))
    folder = os.path.abspath(os.path.expanduser(raw))
    if not multirun and '${' not in raw and os.path.isdir(folder):
        folders.HYDRA_FILES[folder] = folders.snapshot(folder)
    if multirun:
        _check_sweep_free(cfg)


_CHECKED_SWEEPS = set()  # sweep folders already checked (every composition of a sweep has the same one)


def _check_sweep_free(cfg) -> None:
    """One line when a run folder under the sweep folder is held by a live run (``<job>/run.lock``): Hydra would
    rewrite the sweep's ``multirun.yaml`` and a running job's ``.hydra/`` before any job could see the lock. Every
    folder under the sweep folder is checked, not only this sweep's ``hydra.sweep.subdir`` names: jobs of another
    sweep there would find their ``multirun.yaml`` and summary table rewritten as well."""
    import glob

    from vit_gka.train.lock import LOCK_FILE, check_free
    try:
        sweep_dir = os.path.abspath(os.path.expanduser(str(cfg.hydra.sweep.dir)))
    except Exception:  # noqa: BLE001  (an interpolation only Hydra's launcher resolves: its sweep folder is new)
        return
    if sweep_dir in _CHECKED_SWEEPS or not os.path.isdir(sweep_dir):
        return
    _CHECKED_SWEEPS.add(sweep_dir)
    for path in sorted(glob.glob(os.path.join(glob.escape(sweep_dir), '**', LOCK_FILE), recursive=True)):
        try:
            check_free(os.path.dirname(path))
        except UserError as e:
            held = str(e).split('; ')[0]  # who holds it; the advice is a sweep's
            fail(f'sweep folder {sweep_dir} is busy: {held}; wait for that job to end (or stop it), or give another '
                 f'hydra.sweep.dir=<folder>')
