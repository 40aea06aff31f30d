"""Small things users of these tools trip on: plugins that are not installed, the ImageNet root from the
environment, the smoke-run preset, vit-gka-flops wildcards / detail / digits, eval.py bench=true backing off on out
of memory with timm's benchmark.py columns, hubconf's dependencies, sizes in MiB."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from vit_gka.analysis import tables
from vit_gka.measure import benchmark, flops
from vit_gka.errors import UserError
from vit_gka.cli import CONF_DIR
from helpers import ROOT, check, needs_data, one_line_error, run




@pytest.mark.parametrize('override, package', [('hydra/launcher=joblib', 'pip install hydra-joblib-launcher'),
                                               ('hydra/sweeper=ax', 'pip install hydra-ax-sweeper')])
def test_a_missing_hydra_plugin_names_its_package(tmp_path, override, package):
    one_line_error(run(['-m', override], cwd=tmp_path), package)
    assert not os.listdir(tmp_path)


def test_imagenet_root_from_the_environment(monkeypatch):
    monkeypatch.setenv('IMAGENET_ROOT', '/data/in1k')
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        assert compose('config', overrides=['data=imagenet']).data.root == '/data/in1k'
        assert compose('config', overrides=['data=imagenet', 'data.root=/x']).data.root == '/x'
    monkeypatch.delenv('IMAGENET_ROOT')
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        assert compose('config', overrides=['data=imagenet']).data.root is None


@needs_data
def test_smoke_preset_checks_a_configuration_quickly(tmp_path):
    proc = check(run(['debug=smoke', 'recipe=deit', 'workers=0', 'progress=false', 'model.args.depth=1'],
                     cwd=tmp_path))
    [run_dir] = [os.path.join(dp) for dp, _, files in os.walk(tmp_path / 'runs' / 'debug') if 'results.json' in files]
    with open(os.path.join(run_dir, 'results.json')) as f:
        res = json.load(f)
    assert res['epochs'] == 1 and res['train_subset'] == 256 and res['test_images'] == 128, proc.stdout[-500:]


def test_flops_wildcards_detail_and_digits(capsys):
    assert flops.main(['gka_deit_fmnist*', '--detail']) == 0
    out = capsys.readouterr().out
    assert '| 0.01573 |' in out and 'size (MiB, fp32)' in out  # 4 significant digits, the unit it holds
    assert 'fvcore per module' in out and 'blocks.0.attn' in out
    assert flops.main(['zzz_*']) == 2 and "'zzz_*' matches no model" in capsys.readouterr().err


def test_bench_backs_off_the_batch_on_out_of_memory(monkeypatch):
    infer_step = benchmark.ModelUnderTest.infer_step

    def limited(self):  # a device that holds at most 16 images of this model
        if self.batch_size > 16:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        infer_step(self)

    monkeypatch.setattr(benchmark.ModelUnderTest, 'infer_step', limited)
    models = [{'label': 'gka', 'name': 'gka_deit_fmnist_patch7_28', 'args': {}}]
    [row] = benchmark.benchmark_models(models, 'cpu', batch_size=64, warmup=0, steps=1, rounds=1, train=False)
    assert row['batch_size'] == row['infer_batch_size'] == 16  # 64 -> 48 -> 32 -> 24 -> 16 (decay_batch_step)
    assert row['infer_samples_per_sec'] > 0 and row['infer_step_time'] > 0 and row['infer_img_size'] == 28
    assert row['param_count'] == pytest.approx(0.9, abs=0.01)
    monkeypatch.setattr(benchmark.ModelUnderTest, 'infer_step',
                        lambda self: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError('out of memory')))
    with pytest.raises(UserError, match='out of memory at batch 1'):
        benchmark.benchmark_models(models, 'cpu', batch_size=4, warmup=0, steps=1, rounds=1, train=False)


def test_hubconf_lists_what_the_models_import():
    code = ("import sys, timm, vit_gka; timm.create_model('eka_adaptive_deit_tiny_patch16_224'); "
            "timm.create_model('gka_deit_fmnist_patch7_28', pretrained=True); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    sys.path.insert(0, ROOT)
    try:
        import hubconf
    finally:
        sys.path.remove(ROOT)
    ours = {'torch', 'torchvision', 'timm', 'entmax', 'safetensors', 'hydra', 'accelerate', 'fvcore'}
    assert loaded & ours == set(hubconf.dependencies)


def test_sizes_are_labelled_in_mib():
    assert ('size_mb', 'size (MiB, fp32)') in tables.TABLE2
    assert ('infer_peak_mem_mb', 'inference peak MiB') in tables.TABLE4


@needs_data
def test_checkpoint_keep_keeps_the_last_epochs_resumable(tmp_path):
    from vit_gka.train.state import load_checkpoint
    run_dir = tmp_path / 'run'
    check(run(['epochs=3', 'checkpoint_keep=2', 'train_subset=64', 'data.eval_subset=32', 'batch_size=32',
               'workers=0', 'progress=false', 'model.args.depth=1', f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['epoch_2', 'epoch_3', 'last']
    assert [load_checkpoint(str(run_dir / 'checkpoints' / f'epoch_{k}')).state.epoch for k in (2, 3)] == [2, 3]
    assert os.stat(run_dir / 'checkpoints' / 'epoch_3' / 'state.pt').st_ino == \
        os.stat(run_dir / 'checkpoints' / 'last' / 'state.pt').st_ino  # a hard link, not a second copy
    one_line_error(run(['checkpoint_keep=-1'], cwd=tmp_path), 'checkpoint_keep must be a number >= 0')
