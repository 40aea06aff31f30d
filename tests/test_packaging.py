"""Packaging: the wheel holds everything an installed user needs (vit_gka with conf/ and analysis/ mapped into it),
`pip install -e .` maps the same three folders, the console scripts are installed, the package works from a
folder outside the checkout, and every tool answers --help."""
import ast
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT, python

BIN = os.path.dirname(sys.executable)
SCRIPTS = ('vit-gka-train', 'vit-gka-eval', 'vit-gka-export', 'vit-gka-publish', 'vit-gka-flops', 'vit-gka-report',
           'vit-gka-summary')
HELP = {  # command (from the repository root) -> a text its help holds
    ('-m', 'vit_gka.measure.flops', '--help'): 'usage:',
    ('-m', 'vit_gka.analysis.report', '--help'): 'usage:',
    ('-m', 'vit_gka.analysis.summary', '--help'): 'usage:',
    ('-m', 'benchmarks.attention', '--help'): '--core-batch-tokens',
    ('-m', 'benchmarks.kernels', '--help'): '--batch-tokens',
    ('train.py', '--help'): 'powered by Hydra',
    ('eval.py', '--help'): 'powered by Hydra',
}


def _setuptools_version():
    try:
        return tuple(int(p) for p in importlib.metadata.version('setuptools').split('.')[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _project_scripts():
    tomllib = pytest.importorskip('tomllib')  # Python >= 3.11
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)['project']['scripts']


FOLDERS = {'vit_gka': 'vit_gka', 'conf': 'vit_gka/conf', 'analysis': 'vit_gka/analysis'}  # checkout -> installed


def _package_files():
    """Every .py / .yaml / .safetensors (the shipped weights) file of the three folders, as wheel paths."""
    files = set()
    for top, installed in FOLDERS.items():
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != '__pycache__']
            for name in names:
                if name.endswith(('.py', '.yaml', '.safetensors')):
                    rel = os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, top)).replace(os.sep, '/')
                    files.add(f'{installed}/{rel}')
    return files


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """What a source distribution holds, copied out of the checkout (builds leave build/ and *.egg-info)."""
    if _setuptools_version() < (77, 0):
        pytest.skip('needs setuptools >= 77 in this environment (setup.sh installs it) to build without isolation')
    folder = tmp_path_factory.mktemp('source') / 'vit-gka'
    folder.mkdir()
    for name in ('pyproject.toml', 'requirements.txt', 'README.md', 'LICENSE'):
        shutil.copy(os.path.join(ROOT, name), folder / name)
    for top in FOLDERS:
        shutil.copytree(os.path.join(ROOT, top), folder / top,
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info'))
    return folder


@pytest.fixture(scope='module')
def wheel_file(source, tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps', '--no-build-isolation',
                           '--no-index', '-w', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Warning' not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (path,) = out.glob('vit_gka-*.whl')
    return path


@pytest.fixture(scope='module')
def wheel(wheel_file):
    with zipfile.ZipFile(wheel_file) as z:
        return {name: z.read(name).decode() if name.endswith(('.txt', 'METADATA', '.yaml')) else None
                for name in z.namelist()}


def test_wheel_holds_the_package_its_configs_and_nothing_else(wheel):
    names = set(wheel)
    missing = _package_files() - names
    assert not missing, f'not in the wheel: {sorted(missing)}'
    assert {n.split('/')[0] for n in names} == {'vit_gka', 'vit_gka-0.2.0.dist-info'}
    assert any(n.startswith('vit_gka/conf/model/') for n in names) and 'vit_gka/conf/eval.yaml' in names
    assert 'vit_gka/weights/gka_deit_fmnist_patch7_28.vitgka_fmnist.safetensors' in names  # timm pretrained=True
    # the report callback of a -m sweep: its code and the config that names it
    assert 'vit_gka/analysis/report.py' in names
    assert any('vit_gka.analysis.report.ReportCallback' in (text or '') for n, text in wheel.items()
               if n.endswith('.yaml'))


def test_the_installed_wheel_trains_and_reports_outside_the_checkout(wheel_file, tmp_path):
    """The wheel installed into a folder of its own (its dependencies are this environment's): a one-job sweep from
    a folder outside the checkout composes the wheel's configs, trains, and ends with the report."""
    site = tmp_path / 'site'
    proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '--target', str(site),
                           str(wheel_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / 'work'
    work.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(site), 'OMP_NUM_THREADS': '1'}  # before the editable install's hook
    args = ['-m', 'model=gka', 'shape=fmnist', 'epochs=1', 'train_subset=32', 'data.eval_subset=16', 'batch_size=16',
            'workers=0', 'progress=false', 'model.args.depth=1', 'hydra.callbacks.report.num_images=4',
            'hydra.sweep.dir=sweep']
    code = ('import sys, vit_gka.cli, vit_gka.train.main as m; print(vit_gka.cli.CONF_DIR, file=sys.stderr); '
            'sys.argv = ["vit-gka-train", *sys.argv[1:]]; m.main()')
    proc = subprocess.run([sys.executable, '-c', code, *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0] == str(site / 'vit_gka' / 'conf')  # the wheel's configs, not the checkout's
    assert (work / 'sweep' / 'report' / 'report.md').is_file() and (work / 'sweep' / '0_gka_fmnist' / 'results.json').is_file()


def test_wheel_metadata(wheel):
    meta = wheel['vit_gka-0.2.0.dist-info/METADATA']
    assert 'License-Expression: Apache-2.0' in meta
    for extra in ('test', 'slurm', 'sweep'):
        assert f'Provides-Extra: {extra}' in meta
    assert 'Requires-Dist: timm' in meta and 'Requires-Dist: hydra-submitit-launcher' in meta
    entry_points = wheel['vit_gka-0.2.0.dist-info/entry_points.txt']
    for name, target in _project_scripts().items():
        assert f'{name} = {target}' in entry_points
    assert set(_project_scripts()) == set(SCRIPTS)


def test_editable_install_maps_the_three_folders(source, tmp_path):
    """What `pip install -e .` builds: setuptools' import hook, mapping vit_gka, vit_gka.conf and vit_gka.analysis
    to their folders of the checkout (and nothing else: no generic top-level `conf` or `analysis`)."""
    code = f'from setuptools import build_meta; print(build_meta.build_editable({str(tmp_path)!r}))'
    proc = subprocess.run([sys.executable, '-c', code], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / proc.stdout.strip().splitlines()[-1]) as z:
        (finder,) = [n for n in z.namelist() if n.endswith('_finder.py')]
        text = z.read(finder).decode()
    mapping = ast.literal_eval(text.split('MAPPING: dict[str, str] = ', 1)[1].split('\n', 1)[0])
    assert mapping == {'vit_gka': str(source / 'vit_gka'), 'vit_gka.conf': str(source / 'conf'),
                       'vit_gka.analysis': str(source / 'analysis')}


def test_console_scripts_are_installed():
    """The entry points of the installed distribution are pyproject's, each resolves to a function, and its
    script is beside this Python. If this fails after pyproject.toml changed: pip install -e . again."""
    scripts = _project_scripts()
    path = [p for p in sys.path if os.path.abspath(p or '.') != ROOT]  # not a vit_gka.egg-info a build left here
    (dist,) = importlib.metadata.Distribution.discover(name='vit-gka', path=path)
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == 'console_scripts'}
    assert installed == scripts, 'the installed entry points are stale: pip install -e . (setup.sh)'
    for name, target in scripts.items():
        assert os.path.isfile(os.path.join(BIN, name)), name
        module, _, attr = target.partition(':')
        assert callable(getattr(importlib.import_module(module), attr, None)), f'{name}: {target} is not a function'


def _run(args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_outside_the_checkout_and_every_tool_answers_help(tmp_path):
    """`import vit_gka` and timm's registry from another folder, in a fresh interpreter; meanwhile each tool's --help
    (exit 0) from the root."""
    outside = subprocess.Popen([sys.executable, '-c', "import os, timm, vit_gka; "
                                "timm.create_model('gka_deit_small_patch16_224'); print(os.path.dirname(vit_gka.__file__))"],
                               cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    procs = {args: python(args, ROOT) for args in HELP}
    out, err = outside.communicate(timeout=300)
    assert outside.returncode == 0, err[-3000:]
    assert out.strip() == os.path.join(ROOT, 'vit_gka')  # the editable install of this checkout
    failed = [f"{' '.join(args)}: exit {p.returncode}: {(p.stderr or p.stdout)[-300:]}"
              for args, p in procs.items() if p.returncode != 0 or HELP[args] not in p.stdout]
    assert not failed, '\n'.join(failed)


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_console_script_help_outside_the_checkout(script, tmp_path):
    proc = _run([os.path.join(BIN, script), '--help'], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'usage' in proc.stdout.lower() or 'powered by Hydra' in proc.stdout, proc.stdout[-2000:]
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_ci_runs_the_readme_test_command():
    """.ci/run (a fresh CI machine) runs README.md's test command verbatim, after its setup."""
    with open(os.path.join(ROOT, '.ci', 'run')) as f:
        command = [ln.strip() for ln in f if ln.strip() and not ln.startswith('#')][-1]
    assert command == 'bash setup.sh && .venv/bin/python -m pytest -q'
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert f'\n{command}\n' in f.read()


def test_torch_hub_loads_every_registered_model_from_a_checkout():
    import importlib.util

    import timm
    import torch
    spec = importlib.util.spec_from_file_location('hubconf', os.path.join(ROOT, 'hubconf.py'))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    names = timm.list_models(['gka_deit_*', 'vlt_deit_*', '?ka_*_deit_*'])  # the last matches gka_[qk]_deit_* too
    assert len(names) == 28 and all(callable(getattr(hub, n)) for n in names)
    model = torch.hub.load(ROOT, 'gka_deit_small_patch16_224', source='local', num_classes=10, img_size=32)
    assert type(model.blocks[0].attn).__name__ == 'GaussianKernelAttention' and model.num_classes == 10
    with pytest.raises(RuntimeError):  # a name that is no entry point
        torch.hub.load(ROOT, 'deit_small_patch16_224', source='local')
