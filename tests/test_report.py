"""train.py -m on a real short sweep of four models: the sweep folder, each run folder, and analysis/report.py's
report that the Hydra callback builds at its end."""
import csv
import glob
import json
import os
import pathlib

import matplotlib.image as mpimg
import pytest
import timm
import torch
from safetensors.torch import load_file

from vit_gka.analysis import report
from vit_gka.measure.attention import mean_attention_distance, sigma_table
from helpers import HAS_FMNIST, TINY, check, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GKA, EKA, GKA_K, DEIT = '0_gka_fmnist', '1_eka_adaptive_fmnist', '2_gka_k_fmnist', '3_deit_fmnist'


@pytest.fixture(scope='module')
def sweep_run(tmp_path_factory):
    """One tiny sweep of GKA, a compact kernel (EKA, sparsemax) and GKA with a sigma per key, each paired with their
    same-shape DeiT in the report the sweep ends with: (sweep folder, train.py's finished process)."""
    if not HAS_FMNIST:
        pytest.skip('needs the Debian package dataset-fashion-mnist')
    folder = str(tmp_path_factory.mktemp('sweep'))
    proc = check(run(['-m', 'model=gka,eka_adaptive,gka_k,deit', 'shape=fmnist', 'epochs=1',
                      *[a for a in TINY if a != 'progress=false'], f'hydra.sweep.dir={folder}',
                      'hydra.callbacks.report.num_images=8'], cwd=folder))
    assert 'report: ' in proc.stdout  # every -m sweep ends with the report
    return folder, proc


@pytest.fixture(scope='module')
def sweep(sweep_run):
    return sweep_run[0]


def test_the_sweep_and_its_run_folders(sweep_run):
    """train.py -m as the quickstart runs it: one folder per job, the sweep's table, and in each run folder what
    a run leaves (weights, checkpoint, results, TensorBoard, timm's summary.csv, model/), reloaded through timm."""
    folder, proc = sweep_run
    names = [GKA, EKA, GKA_K, DEIT]
    runs = sorted(glob.glob(f'{folder}/*_*fmnist'))
    assert [os.path.basename(r) for r in runs] == names
    assert '| run' in proc.stdout and all(name in proc.stdout for name in names)
    # progress=auto without a terminal (a log file): a line per log_interval updates and per epoch end, no bar
    assert '-m' in proc.args and 'progress=false' not in proc.args and 'it/s' not in proc.stdout + proc.stderr
    assert 'epoch 1/1  step 6/6  update 6  loss ' in proc.stdout
    # the sweep table, saved next to the report
    assert '(runs.md, runs.csv)' in proc.stdout
    assert open(os.path.join(folder, 'runs.md')).read().count('_fmnist') == 8  # run and model columns, 4 rows
    table = list(csv.DictReader(open(os.path.join(folder, 'runs.csv'))))
    assert [r['run'] for r in table] == names and float(table[0]['top-1']) >= 0

    for run_dir, arch, attn in zip([runs[0], runs[3]], ['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224'],
                                   ['GaussianKernelAttention', 'Attention']):
        for path in ('.hydra/config.yaml', 'config.yaml', 'best.safetensors', 'results.json',
                     'checkpoints/last/model.safetensors', 'checkpoints/last/model_ema.safetensors',
                     'checkpoints/last/state.pt', 'model/config.json', 'model/model.safetensors'):
            assert os.path.isfile(os.path.join(run_dir, path)), path
        assert glob.glob(os.path.join(run_dir, 'tb', 'events.out.tfevents.*'))
        assert not glob.glob(os.path.join(run_dir, 'checkpoints', '*.tmp-*'))

        results = json.load(open(os.path.join(run_dir, 'results.json')))
        summary = list(csv.DictReader(open(os.path.join(run_dir, 'summary.csv'))))  # as timm's train.py writes it
        assert len(summary) == 1 and list(summary[0])[:6] == ['epoch', 'train_loss', 'eval_loss', 'eval_top1',
                                                               'eval_top5', 'lr']
        assert float(summary[0]['eval_top1']) == pytest.approx(results['top1'])
        for key in ('model', 'model_args', 'data', 'num_classes', 'img_size', 'epochs', 'seed', 'global_batch_size',
                    'params', 'top1', 'top5', 'ema_top1', 'ema_top5', 'loss', 'train_images_per_s', 'wall_time_s',
                    'sigma_init'):
            assert key in results, key
        assert results['model'] == arch and results['data'] == 'fashion_mnist' and results['num_classes'] == 10
        assert results['img_size'] == 28 and results['global_batch_size'] == 32 and results['epochs'] == 1
        assert results['model_args']['in_chans'] == 1 and results['model_args']['depth'] == 2
        assert 0 <= results['top1'] <= 100 and results['train_images_per_s'] > 0
        # whether the loader is the bottleneck: the share of training time spent waiting for batches
        assert 0 <= results['data_wait_fraction'] < 1 and results['peak_gpu_mem_mb'] is None  # CPU
        assert 0 <= results['history'][0]['data_wait_fraction'] < 1 and results['compiled'] is False
        assert (results['sigma_init'] is None) == (arch == 'deit_tiny_patch16_224')
        assert results['params'] == sum(p.numel() for p in timm.create_model(arch, **results['model_args']).parameters())
        for key in ('params_attn', 'params_mlp', 'gmacs', 'gflops'):  # fvcore's count (vit_gka/measure/flops.py)
            assert results[key] is not None and results[key] > 0, key
        assert results['params_attn'] + results['params_mlp'] < results['params']

        # The raw checkpoint loads through timm's pretrained path, the state with weights_only=True.
        weights = os.path.join(run_dir, 'checkpoints', 'last', 'model.safetensors')
        model = timm.create_model(arch, pretrained=True, **results['model_args'],
                                  pretrained_cfg_overlay=dict(file=weights, num_classes=10))
        saved = load_file(weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
        state = torch.load(os.path.join(run_dir, 'checkpoints', 'last', 'state.pt'), weights_only=True)
        assert state['epoch'] == 1 and state['num_updates'] == 6 and 'optimizer' in state and 'rng' in state

        # The model folder rebuilds the exact model with no other argument; its config.json holds the
        # create_model arguments (what timm < 1.0.31 needs) and the class names.
        config = json.load(open(os.path.join(run_dir, 'model', 'config.json')))
        assert config['model_args']['patch_size'] == 7 and config['model_args']['in_chans'] == 1
        assert config['model_args']['img_size'] in (28, [28, 28])
        assert config['label_names'][:2] == ['T-shirt/top', 'Trouser'] and len(config['label_names']) == 10
        folder = timm.create_model(f'local-dir:{run_dir}/model', pretrained=True)
        assert type(folder.blocks[0].attn).__name__ == attn
        assert folder.num_classes == 10 and tuple(folder.patch_embed.img_size) == (28, 28)
        final = load_file(os.path.join(run_dir, 'model', 'model.safetensors'))
        assert all(torch.equal(folder.state_dict()[k], v) for k, v in final.items())
        which = 'model_ema' if results['model_folder_weights'] == 'ema' else 'model'
        ref = load_file(os.path.join(run_dir, 'checkpoints', 'last', f'{which}.safetensors'))
        assert all(torch.equal(ref[k], v) for k, v in final.items())
        cfg = timm.data.resolve_data_config({}, model=folder)
        assert cfg['input_size'] == (1, 28, 28) and len(cfg['mean']) == 1


def test_callback_writes_tables_and_plots(sweep):
    out = os.path.join(sweep, 'report')
    names = set(os.listdir(out))
    assert {'report.md', 'table2.csv', 'table4.csv', 'top1_vs_gflops.png', 'params_by_part.png',
            'sigma_0_gka_fmnist.png', 'attention_distance_0_gka_fmnist.png'} <= names
    for png in (n for n in names if n.endswith('.png')):
        img = mpimg.imread(os.path.join(out, png))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01, png
    md = open(os.path.join(out, 'report.md')).read()
    assert 'GMACs' in md and 'GFLOPs (2 x MACs)' in md and '| gka_fmnist' in md and '| deit_fmnist' in md


def test_table2_pairs_gka_with_its_baseline(sweep):
    with open(os.path.join(sweep, 'report', 'table2.csv')) as f:
        rows = {r['label']: r for r in csv.DictReader(f)}
    gka, deit = rows['gka_fmnist'], rows['deit_fmnist']
    res = {name: json.load(open(os.path.join(sweep, run, 'results.json')))
           for name, run in (('gka', GKA), ('deit', DEIT))}
    assert gka['baseline'] == 'deit_fmnist' and deit['baseline'] == '' and gka['kind'] == 'GKA'
    assert float(gka['params_m']) == pytest.approx(res['gka']['params'] / 1e6)
    assert float(gka['d_params']) == pytest.approx(100 * (res['gka']['params'] / res['deit']['params'] - 1))
    assert float(gka['d_gflops']) == pytest.approx(100 * (res['gka']['gflops'] / res['deit']['gflops'] - 1))
    assert float(gka['d_params']) < -20 and float(gka['d_gflops']) < -15  # no W_Q, W_K, W_V
    top1 = {k: r['ema_top1'] if r['model_folder_weights'] == 'ema' else r['top1'] for k, r in res.items()}
    assert float(gka['d_top1']) == pytest.approx(top1['gka'] - top1['deit'])


def test_table4_measures_each_pair_interleaved(sweep):
    # no bench.json in the sweep: the report times GKA and its same-shape DeiT side by side, not the runs' own
    # (sequential) throughput
    with open(os.path.join(sweep, 'report', 'table4.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['label'] for r in rows] == ['gka_fmnist', 'deit_fmnist', 'eka_adaptive_fmnist', 'deit_fmnist',
                                          'gka_k_fmnist', 'deit_fmnist']
    rows = rows[:2]
    assert all(r['source'].startswith('interleaved here, ') and 'gka_fmnist / deit_fmnist' in r['source'] for r in rows)
    assert float(rows[0]['infer_images_per_s']) > 0 and float(rows[0]['train_images_per_s']) > 0
    assert rows[0]['baseline'] == rows[1]['label'] and rows[0]['d_train'] != ''


def test_by_hand_on_run_dirs_and_errors(sweep, tmp_path, capsys):
    runs = [os.path.join(sweep, GKA), os.path.join(sweep, DEIT)]
    assert report.main([*runs, '--out', str(tmp_path), '--images', '8']) == 0
    assert 'Table 2' in capsys.readouterr().out and (tmp_path / 'table2.csv').is_file()
    assert report.main([str(tmp_path / 'missing')]) == 2
    assert report.main([str(tmp_path)]) == 2  # a folder without results.json
    assert report.main([]) == 2 and report.main([sweep, '--images', 'x']) == 2
    assert 'error:' in capsys.readouterr().err


def test_sigma_and_attention_distance_of_the_trained_model(sweep):
    model = report.load_model(os.path.join(sweep, GKA))
    assert sigma_table(model).shape == (2, 4)  # blocks, heads
    images = report.test_images(os.path.join(sweep, GKA), model, 8)
    dist = mean_attention_distance(model, images)
    assert dist.shape == (2, 4) and (dist > 0).all() and (dist < 7 * 2 ** 0.5).all()  # 7 x 7 patch grid


def test_attention_distance_limits():
    """A very wide kernel attends uniformly (mean pairwise grid distance); a very narrow one to itself (0)."""
    model = timm.create_model('gka_deit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=64, depth=1,
                              num_heads=2, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    ys, xs = torch.meshgrid(torch.arange(4.), torch.arange(4.), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()], -1)
    uniform = torch.cdist(coords, coords).mean()
    with torch.no_grad():
        model.blocks[0].attn.log_sigma.fill_(12.0)
        assert mean_attention_distance(model, images) == pytest.approx(torch.full((1, 2), uniform.item()), rel=1e-4)
        model.blocks[0].attn.log_sigma.fill_(-8.0)
        assert mean_attention_distance(model, images).abs().max() < 1e-4


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, 'tb'))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_compact_kernel_sparsity_in_results_tensorboard_and_report(sweep):
    """The compact-kernel run and its DeiT baseline: sparsity in results.json and TensorBoard, then in the report
    (Table 2 paired with deit_fmnist, the per-layer section and sparsity.png)."""
    sweep = pathlib.Path(sweep)
    eka, deit = sweep / EKA, sweep / DEIT
    res = json.load(open(eka / 'results.json'))
    sparsity = res['sparsity']
    assert len(sparsity['layers']) == 2 and all(0 < v < 1 for v in sparsity['layers'])  # sparsemax: some zeros
    assert sparsity['mean'] == pytest.approx(sum(sparsity['layers']) / 2)
    assert 0 < res['history'][-1]['sparsity'] < 1
    assert json.load(open(deit / 'results.json'))['sparsity'] is None

    scalars = _tb_scalars(str(eka))
    assert {'sparsity/layer_00', 'sparsity/layer_01', 'sparsity/mean'} <= set(scalars)
    assert scalars['sparsity/mean'] == [pytest.approx(res['history'][-1]['sparsity'])]
    assert not any(tag.startswith('sparsity/') for tag in _tb_scalars(str(deit)))

    out = sweep / 'report'
    with open(out / 'table2.csv') as f:
        rows = {r['label']: r for r in csv.DictReader(f)}
    row = rows['eka_adaptive_fmnist']
    assert row['kind'] == 'compact' and row['attention'] == 'epanechnikov / adaptive'
    assert row['baseline'] == 'deit_fmnist' and float(row['d_params']) < -20
    assert float(row['sparsity']) == pytest.approx(sparsity['mean']) and rows['deit_fmnist']['sparsity'] == ''
    img = mpimg.imread(out / 'sparsity.png')
    assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 0.01
    assert (out / f'sigma_{EKA}.png').is_file()
    md = (out / 'report.md').read_text()
    assert '## Attention sparsity' in md and '![sparsity.png](sparsity.png)' in md
    assert f"- eka_adaptive_fmnist (epanechnikov / adaptive): mean {sparsity['mean']:.3f}" in md


def test_token_bandwidths_follow_the_tokens():
    """token_bandwidths: a fresh data-dependent layer (a = 0) has GKA's one sigma per head on every token; with a
    it follows a_h . x_i of each token, read from the layer's own input."""
    from vit_gka.measure.attention import token_bandwidths
    model = timm.create_model('gka_q_deit_tiny_patch16_224', img_size=28, patch_size=7, in_chans=1, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3).eval()
    images = torch.randn(3, 1, 28, 28)
    sigma = token_bandwidths(model, images)
    assert sigma.shape == (2, 3, 2, 17)  # layers, images, heads, tokens (16 patches + class token)
    expect = model.blocks[0].attn.log_sigma.detach().exp()
    assert torch.allclose(sigma[0], expect.view(1, 2, 1).expand(3, 2, 17))
    with torch.no_grad():
        model.blocks[1].attn.log_sigma_proj.normal_()
    inputs = {}
    model.blocks[1].attn.register_forward_pre_hook(lambda m, args: inputs.setdefault('x', args[0]))
    sigma = token_bandwidths(model, images)
    attn = model.blocks[1].attn
    heads = attn.split_heads(inputs['x'])
    manual = (attn.log_sigma.view(1, 2, 1) + torch.einsum('bhnd,hd->bhn', heads, attn.log_sigma_proj)).exp()
    assert torch.allclose(sigma[1], manual, rtol=1e-5) and sigma[1].std() > 0
    assert token_bandwidths(timm.create_model('gka_deit_tiny_patch16_224', img_size=28, patch_size=7, in_chans=1,
                                              embed_dim=32, depth=1, num_heads=2), images) is None


def test_data_dependent_bandwidths_in_the_report(sweep):
    """The per-key run and its DeiT baseline: kind GKA paired with DeiT, the attention named, the per-token
    bandwidth maps and their spread in the report."""
    out = pathlib.Path(sweep) / 'report'
    with open(out / 'table2.csv') as f:
        rows = {r['label']: r for r in csv.DictReader(f)}
    row = rows['gka_k_fmnist']
    assert row['kind'] == 'GKA' and row['attention'] == 'GKA, sigma per key' and row['baseline'] == 'deit_fmnist'
    img = mpimg.imread(out / f'token_sigma_{GKA_K}.png')
    assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 0.01
    md = (out / 'report.md').read_text()
    assert '- gka_k_fmnist: sigma per token from ' in md and 'std of log sigma over tokens, per layer: ' in md
