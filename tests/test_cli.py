"""train.py's command line as subprocesses: the override check answers mistakes (a misspelt name, a model
family at a shape it does not come in) in one line and leaves Hydra's own features alone (shell completion,
--info, glob() and interval() sweeps); the report and summary command lines."""
import json
import os

import pytest

from helpers import check, needs_data, one_line_error, run
from vit_gka.analysis import report, summary
from vit_gka.cli import check_overrides
from vit_gka.cli import CONF_DIR
from vit_gka.train.validation import validate

# each training run: 1 block, 64 images, 1 epoch
FAST = ['epochs=1', 'train_subset=64', 'data.eval_subset=64', 'batch_size=32', 'workers=0', 'progress=false',
        'model.args.depth=1', 'hydra.callbacks.report.num_images=8']


def test_shell_completion_is_hydras(tmp_path):
    proc = check(run(['-sc', 'install=bash'], cwd=tmp_path, timeout=120))
    assert 'hydra_bash_completion' in proc.stdout and not proc.stderr.startswith('error:')
    assert not os.listdir(tmp_path)


def test_info_defaults_is_hydras(tmp_path):
    proc = check(run(['--info', 'defaults'], cwd=tmp_path, timeout=120))
    assert 'Defaults List' in proc.stdout and 'shape/fmnist' in proc.stdout and 'model/gka' in proc.stdout
    assert not os.listdir(tmp_path)


def test_interval_sweep_is_left_to_a_sampling_sweeper(tmp_path):
    """interval() is for a sweeper plugin (Optuna): the check leaves it to the sweeper, and with Hydra's basic
    sweeper, which cannot sample it, says so in one line instead of Hydra's traceback."""
    from hydra import initialize_config_dir

    from vit_gka.cli import ConfigGroups, _variants
    from vit_gka.cli import CONF_DIR
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        variants, sampled = _variants(ConfigGroups('config', []), ['lr=interval(1e-4,1e-3)', 'seed=0,1'],
                                      multirun=True)
    assert sampled == ['lr=interval(1e-4,1e-3)'] and variants == [['seed=0'], ['seed=1']]
    proc = run(['-m', 'lr=interval(1e-4,1e-3)', f'hydra.sweep.dir={tmp_path}/sweep'], cwd=tmp_path, timeout=120)
    one_line_error(proc, "lr=interval(1e-4,1e-3) needs a sweeper that samples it (pip install '.[sweep]'")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('args, message', [
    (['model=deit_small_patch16_224'], 'give model=timm model.name=deit_small_patch16_224'),
    (['model=gka_fmnist'], "unknown model 'gka_fmnist'"),
    (['model=eka_fixed', 'shape=base'], 'model=eka_fixed has no shape=base (timm has no eka_fixed_deit_base_patch16_224)'),
    (['-m', 'model=gka,bka_adaptive', 'shape=small,base'], 'model=bka_adaptive has no shape=base'),
    (['model=gka', 'shape=native'], 'shape=native is for model=timm'),
    (['model=timm'], 'model=timm needs the timm model name'),
    (['model=vit_small_patch16_224'], 'give model=timm model.name=vit_small_patch16_224'),
    (['model=small'], "unknown model 'small': it is a shape, give shape=small"),
    (['shape=smal'], "unknown shape 'smal' (did you mean 'small'?)"),
    (['model=gka,deit'], 'is a sweep: add -m'),
    (['-m', 'model=glob(zz*)'], 'matches no model'),
    (['-m', 'hydra/callbacks=report'], 'every -m sweep ends with the report'),
    (['workers=many'], "workers must be an integer (data loader processes per training process, or auto), got 'many'"),
    (['workers=-1'], 'workers must be >= 0'),
    (['log_with=foo'], "log_with: unknown tracker 'foo'; choose from all, aim, tensorboard"),
])
def test_mistakes_give_one_line(tmp_path, capsys, args, message):
    """The check itself, in this process (train.py runs it before Hydra: see the next test)."""
    with pytest.raises(SystemExit) as e:
        check_overrides(CONF_DIR, 'config', argv=args + [f'hydra.run.dir={tmp_path}/run'], validate=validate)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines


@pytest.mark.parametrize('args, message', [
    (['model=gkaa'], "error: unknown model 'gkaa' (did you mean 'gka'?)"),
    (['model=tka_adaptive', 'shape=base'], 'model=tka_adaptive has no shape=base'),
])
def test_train_py_answers_in_one_line(tmp_path, args, message):
    proc = run(args, cwd=tmp_path, timeout=120)
    one_line_error(proc, message)
    assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def glob_sweep(tmp_path_factory):
    """``-m 'model=glob(gka*,exclude=gka_*)' shape=fmnist``: Hydra expands the glob against the model options (gka,
    not gka_q / gka_k) and runs it."""
    folder = tmp_path_factory.mktemp('glob')
    proc = check(run(['-m', 'model=glob(gka*,exclude=gka_*)', 'shape=fmnist', *FAST, f'hydra.sweep.dir={folder}/sweep'],
                     cwd=folder, timeout=300))
    return folder / 'sweep', proc


@needs_data
def test_glob_sweep_runs_the_matching_jobs(glob_sweep):
    sweep, proc = glob_sweep
    assert sorted(p for p in os.listdir(sweep) if p[0].isdigit()) == ['0_gka_fmnist']
    res = json.load(open(sweep / '0_gka_fmnist' / 'results.json'))
    assert res['model'] == 'gka_deit_tiny_patch16_224' and res['model_config'] == 'gka_fmnist'
    assert (sweep / 'report' / 'report.md').is_file() and 'report: ' in proc.stdout  # every sweep ends with it


@needs_data
def test_summary_command_line(glob_sweep, tmp_path, capsys):
    sweep, _ = glob_sweep
    assert summary.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert '| run' in out and '0_gka_fmnist' in out and 'gka_fmnist' in out
    assert summary.main([str(tmp_path)]) == 2 and summary.main([str(tmp_path / 'missing')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: no results.json under {tmp_path}', f'error: {tmp_path / "missing"} is not a folder']
    assert summary.main([]) == 2 and 'FOLDER' in capsys.readouterr().err  # argparse's usage error
    assert summary.main(['--help']) == 0 and 'results.json' in capsys.readouterr().out


def test_report_command_line_help_and_errors(tmp_path, capsys):
    assert report.main(['--help']) == 0
    out = capsys.readouterr().out
    assert '--out DIR' in out and '--images N' in out
    assert report.main([str(tmp_path / 'missing')]) == 2
    assert capsys.readouterr().err.strip() == f'error: {tmp_path / "missing"} is not a folder'
    assert report.main([str(tmp_path), '--images', '0']) == 2 and 'positive integer' in capsys.readouterr().err
