"""The command-line entry points as Hydra users use them: no torch or timm before a job runs (fast --help and tab
completion), a user's own config groups through Hydra's search path, eval.py's own options, and eval.py on many
models at once (timm's wildcard, a list, a sweep folder) into one results file."""
import csv
import os
import subprocess
import sys
import textwrap

from helpers import ROOT, check, needs_data, one_line_error, run, script

EVAL = os.path.join(ROOT, 'eval.py')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HYDRA_FULL_ERROR': '0'}
TINY = ['epochs=1', 'train_subset=64', 'data.eval_subset=32', 'batch_size=32', 'workers=0', 'progress=false',
        'model.args.depth=1']


def _python(code, cwd=ROOT):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _eval(args, cwd):
    return script('eval.py', args, cwd=cwd, env=ENV)


def test_entry_modules_import_no_torch():
    proc = _python('''
        import sys
        import train, eval  # the scripts, as python train.py / eval.py load them
        import vit_gka.train.main, vit_gka.eval_main  # the console scripts' modules
        heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'accelerate') if m in sys.modules)
        print('loaded:', heavy)
    ''')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'loaded: []' in proc.stdout


def test_importing_vit_gka_registers_the_models_before_or_after_timm():
    proc = _python('''
        import vit_gka
        import timm  # imported after vit_gka: the models are registered once timm has loaded
        assert timm.is_model('gka_deit_fmnist_patch7_28') and 'gka' in __import__(
            'timm.models.vision_transformer', fromlist=['ATTN_LAYERS']).ATTN_LAYERS
        print(vit_gka.GaussianKernelAttention.__name__)
    ''')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'GaussianKernelAttention' in proc.stdout


def _user_model(tmp_path):
    folder = tmp_path / 'my_conf' / 'model'
    folder.mkdir(parents=True)
    (folder / 'mine.yaml').write_text("# a user's attention family: GKA\nname: gka_deit_${.arch}\n")
    return tmp_path / 'my_conf'


@needs_data
def test_a_users_config_group_through_hydra_searchpath_trains(tmp_path):
    conf = _user_model(tmp_path)
    proc = check(run([f'hydra.searchpath=[file://{conf}]', 'model=mine', 'shape=fmnist', *TINY,
                      f'hydra.run.dir={tmp_path}/run'], cwd=tmp_path))
    assert 'mine_fmnist: test top-1' in proc.stdout and (tmp_path / 'run' / 'results.json').is_file()
    # the same group through --config-dir; a misspelt option is still one line, with the user's options in it
    one_line_error(run(['--config-dir', str(conf), 'model=mien'], cwd=tmp_path), "unknown model 'mien' (did you "
                                                                                  "mean 'mine'?)")
    one_line_error(run([f'hydra.searchpath=[file://{conf}]', 'model=mien'], cwd=tmp_path), 'gka, gka_k, gka_q, mine')


def test_eval_help_and_training_groups(tmp_path):
    proc = _eval(['--help'], tmp_path)
    assert proc.returncode == 0 and 'results_file:' in proc.stdout and 'bench_cfg:' in proc.stdout
    assert 'shape:' not in proc.stdout and 'recipe' not in proc.stdout and 'experiment' not in proc.stdout
    for group in ('shape=small', 'model=gka', 'recipe=deit'):
        one_line_error(_eval([group], tmp_path), f"{group.split('=')[0]}= is a training option, not one of eval.py")
    assert not os.listdir(tmp_path)


def _results(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_data
def test_eval_wildcard_writes_one_results_file(tmp_path):
    proc = _eval(["model_name=gka*", 'data.eval_subset=256', 'workers=0', 'progress=false',
                  f'hydra.run.dir={tmp_path}/out'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _results(tmp_path / 'out' / 'results.csv')
    assert [r['model'] for r in rows] == ['gka_deit_fmnist_patch7_28']  # the only gka* with published weights
    row = rows[0]
    assert float(row['top1']) > 85 and abs(float(row['top1']) + float(row['top1_err']) - 100) < 1e-6
    assert 0.9 < float(row['params (M)']) < 0.91 and 0.015 < float(row['GMACs']) < 0.016
    assert row['img_size'] == '28' and row['crop_pct'] and float(row['images/s']) > 0
    assert '| gka_deit_fmnist_patch7_28 ' in (tmp_path / 'out' / 'results.md').read_text()
    with open(tmp_path / 'out' / 'eval.log') as f:
        assert 'gka_deit_fmnist_patch7_28: batch 1/1' in f.read()  # progress lines in the log
    one_line_error(_eval(['model_name=zzz*', f'hydra.run.dir={tmp_path}/none'], tmp_path),
                   'model_name=zzz* matches no timm model with published weights')
