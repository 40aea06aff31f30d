"""eval.py on a real short training run: it reproduces the recorded top-1 through timm.create_model, loads
raw / EMA checkpoints and bare weight files, benchmarks against the baseline, and reports user errors."""
import json
import os

import pytest
from hydra import compose, initialize_config_dir

from vit_gka import evaluate as evaluation
from vit_gka.analysis import report, tables
from vit_gka.measure.benchmark import baseline_name
from vit_gka.errors import UserError
from vit_gka.cli import CONF_DIR

from helpers import Payload, copy_run, script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(finished_run):
    """The shared finished run (conftest.py) and its results.json."""
    with open(finished_run / 'results.json') as f:
        return str(finished_run), json.load(f)


def eval_cfg(*overrides):
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        return compose('eval', overrides=['workers=0', *overrides])


def test_eval_py_reproduces_the_recorded_top1(run, tmp_path):
    folder, res = str(copy_run(run[0], tmp_path)), run[1]  # eval.py writes eval.json into the run folder
    proc = script('eval.py', [f'run={folder}', 'workers=0', f'hydra.run.dir={folder}/eval_hydra'], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(folder, 'eval.json')) as f:
        out = json.load(f)
    recorded = res['ema_top1'] if res['model_folder_weights'] == 'ema' else res['top1']
    assert out['top1'] == pytest.approx(recorded, abs=1e-9) and out['matches_recorded'] is True
    assert out['num_images'] == 32 and out['data'] == 'fashion_mnist' and out['images_per_s'] > 0
    assert {'top5', 'loss'} <= set(out) and 'same' in proc.stdout


@pytest.mark.parametrize('weights,key', [('model', 'top1'), ('ema', 'ema_top1')])
def test_raw_and_ema_checkpoints(run, weights, key):
    folder, res = run
    cfg = eval_cfg(f'run={folder}', f'ckpt={folder}/checkpoints/last', f'weights={weights}')
    out = evaluation.evaluate_model(cfg, folder, evaluation.run_config(folder).data)
    assert out['top1'] == pytest.approx(res[key], abs=1e-9)
    assert out['weights'].endswith('model_ema.safetensors' if weights == 'ema' else 'model.safetensors')


def test_model_name_with_a_weights_file(run):
    folder, res = run
    shape = ','.join(f'{k}:{v}' for k, v in res['model_args'].items() if k != 'num_classes')
    cfg = eval_cfg(f"model_name={res['model']}", f'ckpt={folder}/checkpoints/last/model.safetensors',
                   f'model_args={{{shape}}}', 'data.eval_subset=32')
    out = evaluation.evaluate_model(cfg, None, cfg.data)
    assert out['top1'] == pytest.approx(res['top1'], abs=1e-9)


def test_benchmark_interleaves_gka_and_baseline_and_feeds_the_report(run, tmp_path):
    folder, _ = run
    assert baseline_name('gka_deit_small_patch16_224') == 'deit_small_patch16_224'
    assert baseline_name('deit_small_patch16_224') is None
    cfg = eval_cfg(f'run={folder}', 'bench=true', 'bench_cfg.batch_size=8', 'bench_cfg.warmup=0',
                   'bench_cfg.steps=1', 'bench_cfg.rounds=2')
    rows = evaluation.benchmark(cfg, folder)
    assert [r['model'] for r in rows] == ['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224']
    assert rows[0]['input_size'] == rows[1]['input_size'] == [1, 28, 28]
    assert all(r['infer_images_per_s'] > 0 and r['train_images_per_s'] > 0 for r in rows)
    assert rows[0]['ratio_infer_images_per_s'] == pytest.approx(
        rows[0]['infer_images_per_s'] / rows[1]['infer_images_per_s'])
    (tmp_path / 'bench').mkdir()
    with open(tmp_path / 'bench' / 'bench.json', 'w') as f:
        json.dump({'results': rows}, f)
    t4 = tables.table4(report.load_runs([folder]), tables.load_bench([str(tmp_path)]))
    assert t4[0]['baseline'] == rows[1]['label'] and t4[0]['d_infer'] == pytest.approx(
        100 * (rows[0]['ratio_infer_images_per_s'] - 1))


def test_user_errors_in_process(run, tmp_path):
    folder, _ = run
    for overrides, message in ((['model_name=gka_deit_tiny_patch16_224', 'ckpt=/no/such/file'], 'ckpt does not exist'),
                               ([f'run={folder}', f'ckpt={folder}', 'weights=ema2'], 'weights must be one of model, ema'),
                               (['model_name=gka_deit_tiny_patch16_224'], 'has no published weights.*ckpt=<weights file>')):
        cfg = eval_cfg(*overrides)
        with pytest.raises(UserError, match=message):
            evaluation.evaluate_model(cfg, cfg.run, cfg.data)


def test_user_errors_are_one_line(tmp_path):
    for args in (['run=/no/such/run'], ['model_name=no_such_model', f'ckpt={tmp_path}']):
        proc = script('eval.py', [*args, f'hydra.run.dir={tmp_path}/hydra'], cwd=ROOT, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert proc.stderr.startswith('error: ') and 'Traceback' not in proc.stderr, args



@pytest.mark.parametrize('case, message', [
    ('pickle', 'refusing to load'),
    ('truncated', 'is truncated or not a safetensors file'),
    ('not weights', 'is truncated or not a checkpoint'),
    ('classes', 'head.weight is [7, 128] in the checkpoint, [10, 128] in the model'),
    ('architecture', 'another architecture (blocks.0.attn.log_sigma missing from the checkpoint)'),
])
def test_bad_checkpoints_are_refused_in_one_line(run, tmp_path, case, message):
    """eval.py ckpt=<file>: nothing of a bad file is loaded or run, and the run folder stays as it was."""
    import timm
    import torch
    from safetensors.torch import save_file

    from helpers import digest, one_line_error
    folder, res = run
    args = {k: v for k, v in res['model_args'].items() if k != 'num_classes'}
    marker = tmp_path / 'payload_ran'
    path = tmp_path / ('weights.pt' if case in ('pickle', 'not weights') else 'weights.safetensors')
    if case == 'pickle':
        torch.save({'state_dict': {}, 'payload': Payload(str(marker))}, path)
    elif case == 'truncated':
        data = open(os.path.join(folder, 'checkpoints', 'last', 'model.safetensors'), 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif case == 'not weights':
        path.write_text('not a checkpoint\n')
    elif case == 'classes':
        save_file(timm.create_model(res['model'], **{**args, 'num_classes': 7}).state_dict(), path)
    else:
        save_file(timm.create_model('deit_tiny_patch16_224', **args, num_classes=10).state_dict(), path)
    before = digest(folder)
    proc = script('eval.py', [f'run={folder}', f'ckpt={path}', 'workers=0', f'hydra.run.dir={tmp_path}/hydra'],
                  cwd=ROOT, timeout=120)
    one_line_error(proc, message)
    assert digest(folder) == before and not (tmp_path / 'hydra').exists() and not marker.exists()


def test_compare_to_run_allows_rounding_for_bf16_and_compiled_runs():
    # eval.py runs eager; a run evaluated under bf16 autocast or torch.compile rounds differently (a GPU run)
    fp32 = {'top1': 80.0, 'ema_top1': 79.0, 'model_folder_weights': 'model', 'data': 'folder', 'mixed_precision': 'no',
            'compiled': False}
    assert evaluation.compare_to_run(fp32, 'folder', 80.0)['matches_recorded'] is True
    assert evaluation.compare_to_run(fp32, 'folder', 80.1) == {'recorded_top1': 80.0, 'top1_tolerance': 0.0,
                                                                'matches_recorded': False}
    for changed in ({'mixed_precision': 'bf16'}, {'compiled': True}):
        rounded = {**fp32, **changed}
        assert evaluation.compare_to_run(rounded, 'folder', 80.3)['matches_recorded'] is True
        assert evaluation.compare_to_run(rounded, 'folder', 80.6)['matches_recorded'] is False
    assert evaluation.compare_to_run({**fp32, 'model_folder_weights': 'ema'}, 'folder', 79.0)['recorded_top1'] == 79.0
    assert evaluation.compare_to_run(fp32, 'fashion_mnist', 80.0)['matches_recorded'] is False  # other data
