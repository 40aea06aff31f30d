"""The timing harness (vit_gka/measure/benchmark.py), the model-vs-baseline benchmark of eval.py bench=true
and the benchmark scripts (benchmarks/attention.py, kernels.py, fmnist_folder.py) on tiny sizes: they run, their
options and JSON hold, mistakes end in one line. No timings are checked: CI machines are noisy."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vit_gka.measure import benchmark as harness
from vit_gka.errors import UserError

from helpers import ROOT, needs_data, python

CPU = torch.device('cpu')
BENCH_KEYS = {'label', 'model', 'batch_size', 'input_size', 'device', 'dtype', 'compiled', 'steps', 'rounds', 'torch',
              'timm', 'infer_images_per_s', 'train_images_per_s', 'infer_peak_mem_mb', 'train_peak_mem_mb', 'baseline'}
RATIO_KEYS = {f'ratio_{k}' for k in ('infer_images_per_s', 'train_images_per_s', 'infer_peak_mem_mb', 'train_peak_mem_mb')}
# timm benchmark.py's names of the same numbers (and its param_count, in millions)
TIMM_KEYS = {'param_count'} | {f'{phase}_{k}' for phase in ('infer', 'train')
                               for k in ('samples_per_sec', 'step_time', 'batch_size', 'img_size')}


def test_timed_and_interleaved_medians_call_in_turns():
    calls = []
    assert harness.timed(lambda: calls.append('x'), CPU, calls=3, warmup=2) >= 0 and calls == ['x'] * 5
    calls.clear()
    fns = {name: (lambda name=name: calls.append(name)) for name in 'ABC'}
    medians = harness.interleaved_medians(fns, CPU, reps=2, warmup=1)
    assert list(medians) == ['A', 'B', 'C'] and all(m >= 0 for m in medians.values())
    assert ''.join(calls) == 'ABC' * 3  # one warm-up round, then two timed rounds, A B C each time


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='CPU peak memory needs Linux /proc')
def test_cpu_peak_memory_sees_a_64_mb_allocation():
    """In a process set up as the benchmark scripts re-run themselves (reexec_for_rss): freed blocks go back to
    the OS, so a 64 MB tensor shows as 64 MB more peak RSS (in a long-lived process such as this one glibc may
    hand out memory it already holds, and the growth reads 0)."""
    code = ('import torch; from vit_gka.measure.benchmark import peak_memory_mb; '
            'print(peak_memory_mb(lambda: torch.ones(16 * 2 ** 20), torch.device("cpu")))')
    proc = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 60 < float(proc.stdout) < 200
    assert harness.allocated_peak_mb(CPU) is None  # the allocator peak is a CUDA notion
    assert harness.ratio(2.0, 4.0) == 0.5 and harness.ratio(None, 4.0) is None


def test_print_rows_and_write_json(tmp_path, capsys):
    harness.print_rows([{'seq': 197, 'ms': 1.23456, 'peak_mb': None}], 'title')
    assert capsys.readouterr().out.splitlines()[1:] == ['### title', '', '| seq | ms | peak_mb |', '|---|---|---|',
                                                        '| 197 | 1.23 | None |']
    harness.write_json(str(tmp_path / 'out.json'), {'reps': 1}, rows=[1, 2])
    assert json.loads((tmp_path / 'out.json').read_text()) == {'config': {'reps': 1}, 'rows': [1, 2]}
    harness.write_json(None, {'reps': 1})  # no path: nothing written


def test_with_baseline():
    args = {'img_size': 32, 'window_2d': 1, 'sigma_init': 1.0}
    models = harness.with_baseline('gka', 'gka_deit_tiny_patch16_224', args)
    assert [m['name'] for m in models] == ['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224']
    assert models[1] == {'label': 'deit_tiny_patch16_224 (same shape)', 'name': 'deit_tiny_patch16_224',
                         'args': {'img_size': 32}}
    assert len(harness.with_baseline('deit', 'deit_tiny_patch16_224', {})) == 1
    assert harness.with_baseline('d', 'deit_tiny_patch16_224', {}, 'deit_tiny_patch16_224')[1]['label'] == \
        'deit_tiny_patch16_224 (baseline)'
    with pytest.raises(UserError, match="unknown baseline model 'nope'"):
        harness.with_baseline('gka', 'gka_deit_tiny_patch16_224', {}, 'nope')


def test_benchmark_models_rows_are_bench_json(capsys):
    """The rows eval.py bench=true writes to bench.json: these keys, the model first with its ratios."""
    models = harness.with_baseline('gka', 'gka_deit_tiny_patch16_224', {'img_size': 32, 'depth': 1})
    rows = harness.benchmark_models(models, CPU, batch_size=2, warmup=0, steps=1, rounds=2, train=True)
    assert set(rows[0]) == BENCH_KEYS | RATIO_KEYS | TIMM_KEYS and set(rows[1]) == BENCH_KEYS | TIMM_KEYS
    assert rows[0]['baseline'] == rows[1]['label'] and rows[1]['baseline'] is None
    assert rows[0]['input_size'] == [3, 32, 32] and rows[0]['dtype'] == 'fp32' and rows[0]['device'] == 'cpu'
    assert rows[0]['infer_peak_mem_mb'] is None and rows[0]['ratio_train_peak_mem_mb'] is None  # CPU
    assert rows[0]['ratio_train_images_per_s'] == pytest.approx(rows[0]['train_images_per_s'] / rows[1]['train_images_per_s'])
    assert 'inference speed x' in capsys.readouterr().out
    infer_only = harness.benchmark_models(models[:1], CPU, batch_size=2, warmup=0, steps=1, rounds=1, train=False)
    assert infer_only[0]['train_images_per_s'] is None and 'ratio_infer_images_per_s' not in infer_only[0]
    assert infer_only[0]['compiled'] is False and infer_only[0]['torch'] == torch.__version__
    # bench_cfg.compile=true: torch.compile'd as a training run on CUDA is (the warm-up step compiles)
    compiled = harness.benchmark_models(models[:1], CPU, batch_size=2, warmup=1, steps=1, rounds=1, train=False,
                                        compile=True)
    assert compiled[0]['compiled'] is True and compiled[0]['infer_images_per_s'] > 0
    with pytest.raises(UserError, match='must be > 0'):
        harness.benchmark_models(models, CPU, steps=0)


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import attention, kernels
    return attention, kernels


def test_attention_benchmark_tiny(scripts, tmp_path, capsys):
    attention, _ = scripts
    out = tmp_path / 'attention.json'
    attention.main(['--seqs', '17', '--heads', '2', '--head-dim', '8', '--core-batch-tokens', '34', '--reps', '1',
                    '--warmup', '0', '--windows', '1', '--train', '--models', '--profile',
                    '--out', str(out)])
    data = json.loads(out.read_text())
    assert data['config']['seqs'] == [17] and data['config']['models'] == [] and data['config']['train'] is True
    assert {r['window_2d'] for r in data['core']} == {None, 1} and data['models'] == []
    assert {r['impl'] for r in data['core']} >= {attention.STANDARD, 'gka sdpa_bias', 'gka sdpa_pad', 'gka reference'}
    assert [r['layer'] for r in data['layers']] == ['timm Attention', 'GaussianKernelAttention']
    printed = capsys.readouterr().out
    assert '### attention core N=17 B=2 window_2d=1' in printed and '### kernels of one call, N=17' in printed
    assert all(r['kernels'] for r in data['core'])  # --profile: the operators each call ran, with their shares
    assert any('scaled_dot_product' in r['kernels'] for r in data['core'] if r['impl'] == attention.STANDARD)


def test_kernels_benchmark_tiny(scripts, tmp_path):
    _, kernels = scripts
    out = tmp_path / 'kernels.json'
    kernels.main(['--seqs', '17', '--dim', '16', '--heads', '2', '--batch-tokens', '17', '--reps', '1', '--warmup', '0',
                  '--out', str(out)])
    data = json.loads(out.read_text())
    assert data['config']['dim'] == 16 and len(data['rows']) == 7  # fused GKA + 3 kernels x 2 normalisations
    assert data['rows'][0]['attention'] == 'gka fused (auto)' and data['rows'][0]['time_vs_gka'] == 1.0


def test_benchmark_options_defaults_and_mistakes(scripts, capsys):
    attention, kernels = scripts
    args = attention.parser().parse_args([])
    assert (args.seqs, args.heads, args.head_dim, args.core_batch_tokens, args.reps, args.warmup) == \
        ([197, 577, 1025, 4097], 6, 64, 8192, 7, 2)
    assert (args.model_batch, args.img_size, args.train, args.windows, args.reference_max_seq, args.out) == \
        (64, 224, False, [], 4097, None)
    assert (args.sdpa_kernels, args.profile) == (False, False)
    assert args.models == attention.MODELS
    args = kernels.parser().parse_args([])
    assert (args.seqs, args.dim, args.heads, args.batch_tokens, args.reps, args.warmup, args.train) == \
        ([197, 577, 1025], 384, 6, 4096, 5, 1, False)
    for main, argv in ((attention.main, ['--dtype', 'floaty']), (kernels.main, ['--device', 'nope'])):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    with pytest.raises(SystemExit) as e:
        attention.main(['--models', 'only_one_name'])
    assert e.value.code == 2 and 'GKA_MODEL,BASELINE_MODEL' in capsys.readouterr().err



@needs_data
def test_fmnist_folder_writes_an_imagenet_layout(scripts, tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.datasets import FashionMNIST, ImageFolder

    from benchmarks import fmnist_folder
    from vit_gka.cli import compose_option
    from vit_gka.data.datasets import fashion_mnist_root
    out = tmp_path / 'fmnist'
    fmnist = compose_option('data', 'fashion_mnist')
    fmnist_folder.main([str(out), '--size', '32', '--train-per-class', '2', '--val-per-class', '1', '--workers', '2'])
    for split, per_class in (('train', 2), ('val', 1)):
        classes = sorted(os.listdir(out / split))
        assert len(classes) == 10 and classes[0] == '0_T-shirt_top' and classes[9] == '9_Ankle boot'
        assert all(len(os.listdir(out / split / c)) == per_class for c in classes)
        # any ImageFolder reader's labels (sorted folders) are Fashion-MNIST's: the file names are test indices
        targets = FashionMNIST(fashion_mnist_root(fmnist)[0], train=split == 'train').targets
        for label, c in enumerate(ImageFolder(str(out / split)).classes):
            assert all(targets[int(f.split('.')[0])] == label for f in os.listdir(out / split / c)), c
    image = Image.open(next((out / 'train' / '8_Bag').iterdir()))
    assert image.size == (32, 32) and image.mode == 'RGB' and image.format == 'JPEG'
    assert 'train: 20 images of 10 classes' in capsys.readouterr().out
    # --format png: the test images exactly, gray, as timm's validate.py reads them
    fmnist_folder.main([str(tmp_path / 'png'), '--size', '28', '--format', 'png', '--train-per-class', '1',
                        '--val-per-class', '1', '--workers', '1'])
    test = FashionMNIST(fashion_mnist_root(fmnist)[0], train=False)
    png = next((tmp_path / 'png' / 'val' / '9_Ankle boot').iterdir())
    assert (torch.from_numpy(np.asarray(Image.open(png))) == test.data[int(png.stem)]).all()
    with pytest.raises(SystemExit) as e:  # never writes into a folder that holds something
        fmnist_folder.main([str(out)])
    assert e.value.code == 2 and 'is not empty' in capsys.readouterr().err


@needs_data
def test_training_benchmark_times_the_loop_and_the_bare_step(tmp_path):
    """benchmarks/training.py on a few steps of the small quickstart shape: both ways for both models, the profile's
    labels (set by loop.py), and one line for a model train.py does not have."""
    out = tmp_path / 'training.json'
    run = ['-m', 'benchmarks.training', '--shape', 'tiny_fmnist', '--steps', '2', '--reps', '1']
    proc = python(run + ['--profile', '--out', str(out), '--', 'batch_size=16', 'model.args.depth=1'], ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r['model'] for r in data['rows']] == ['gka', 'deit'] and data['rows'][1]['loop vs DeiT'] == 1.0
    assert all(r['bare img/s'] > 0 and r['loop img/s'] > 0 for r in data['rows'])
    profile = data['profiles']['gka']
    assert set(profile) == {'data', 'forward', 'backward', 'optimizer', 'ema', 'rest', 'step'}
    assert profile['forward'] > 0 and profile['backward'] > 0 and profile['data'] > 0
    assert '### Training images/s' in proc.stdout and 'shape=tiny_fmnist' in proc.stdout
    bad = python(run + ['--models', 'gka,nope'], ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith('error: ') and "'model/nope'" in bad.stderr
