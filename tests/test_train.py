"""train.py end to end on tiny Fashion-MNIST subsets (CPU): a GKA model and its baseline as one Hydra
multirun, the run folder's contents and their reload through timm, exact resume, a compiled run's model, and
one-line errors for user mistakes that leave an existing run folder as it was; the recipe's model arguments and
unknown-model message. The helpers are tests/helpers.py."""
import csv
import glob
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import vit_gka  # noqa: F401
from helpers import TINY, check, digest, needs_data, one_line_error, run
from omegaconf import OmegaConf
from vit_gka.errors import UserError
from vit_gka.train import recipe
from vit_gka.cli import check_overrides
from vit_gka.cli import CONF_DIR
from vit_gka.train.validation import validate

@needs_data
def test_gka_and_baseline_multirun(tmp_path):
    proc = check(run(['-m', 'model=gka,deit', 'shape=fmnist', 'epochs=1', *[a for a in TINY if a != 'progress=false'],
                      f'hydra.sweep.dir={tmp_path}/sweep'], cwd=tmp_path))
    runs = sorted(glob.glob(f'{tmp_path}/sweep/*_*fmnist'))
    assert [os.path.basename(r) for r in runs] == ['0_gka_fmnist', '1_deit_fmnist']
    assert '| run' in proc.stdout and '0_gka_fmnist' in proc.stdout and '1_deit_fmnist' in proc.stdout
    # progress=auto without a terminal (a log file): a line per log_interval updates and per epoch end, no bar
    assert '-m' in proc.args and 'progress=false' not in proc.args and 'it/s' not in proc.stdout + proc.stderr
    assert 'epoch 1/1  step 6/6  update 6  loss ' in proc.stdout
    # the sweep table, saved next to the report
    assert '(runs.md, runs.csv)' in proc.stdout
    assert (tmp_path / 'sweep' / 'runs.md').read_text().count('_fmnist') == 4  # run and model columns, 2 rows
    table = list(csv.DictReader(open(tmp_path / 'sweep' / 'runs.csv')))
    assert [r['run'] for r in table] == ['0_gka_fmnist', '1_deit_fmnist'] and float(table[0]['top-1']) >= 0

    for run_dir, arch, attn in zip(runs, ['gka_deit_tiny_patch16_224', 'deit_tiny_patch16_224'],
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


@needs_data
def test_resume_is_exact(tmp_path):
    # Drop path (torch RNG), mixup / cutmix (numpy RNG), random erasing and a worker process all in play.
    args = ['epochs=2', *TINY, 'model.args.depth=1', 'drop_path=0.1', 'aug.mixup=0.8', 'aug.cutmix=1.0',
            'aug.re_prob=0.25', 'workers=1', 'save_model=false']
    check(run([*args, f'hydra.run.dir={tmp_path}/straight'], cwd=tmp_path))
    check(run([*args, 'stop_epoch=1', f'hydra.run.dir={tmp_path}/first'], cwd=tmp_path))
    state = torch.load(tmp_path / 'first' / 'checkpoints' / 'last' / 'state.pt', weights_only=True)
    assert state['epoch'] == 1
    check(run([*args, f'resume={tmp_path}/first', f'hydra.run.dir={tmp_path}/resumed'], cwd=tmp_path))
    for name in ('model.safetensors', 'model_ema.safetensors'):
        a = load_file(tmp_path / 'straight' / 'checkpoints' / 'last' / name)
        b = load_file(tmp_path / 'resumed' / 'checkpoints' / 'last' / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sa = torch.load(tmp_path / 'straight' / 'checkpoints' / 'last' / 'state.pt', weights_only=True)
    sb = torch.load(tmp_path / 'resumed' / 'checkpoints' / 'last' / 'state.pt', weights_only=True)
    assert sa['epoch'] == sb['epoch'] == 2 and sa['num_updates'] == sb['num_updates']
    ra = json.load(open(tmp_path / 'straight' / 'results.json'))
    rb = json.load(open(tmp_path / 'resumed' / 'results.json'))
    assert ra['top1'] == rb['top1'] and ra['loss'] == rb['loss']


@needs_data
def test_a_compiled_run_saves_the_plain_timm_model():
    # compile=true (CUDA's default with compile=auto) wraps the model in torch.compile's module (state-dict keys
    # _orig_mod.*); what a run saves, EMA's and measures is the timm model inside it. Built here as train.py builds
    # it, without running it (compiling on the CPU is a minute of C++): the compiled run end to end, with DDP, bf16,
    # a kill and resume, and its saved files read back, is test_recipe_deit.py's GPU recipe.
    from accelerate.state import AcceleratorState
    from torch._dynamo.eval_frame import OptimizedModule

    from benchmarks.training import compose_run
    from vit_gka.train.distributed import make_accelerator
    from vit_gka.train.job import build_parts
    cfg = compose_run(['compile=true', 'cpu=true', 'log_with=none', *TINY, 'model.args.depth=1'])
    try:
        parts, setup = build_parts(cfg, make_accelerator(cfg))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert isinstance(parts.model, OptimizedModule) and parts.raw_model is parts.model._orig_mod
    keys = set(timm.create_model(setup.model_name, **setup.model_args).state_dict())
    assert set(parts.raw_model.state_dict()) == keys and set(parts.model_ema.module.state_dict()) == keys


@pytest.fixture(scope='module')
def existing_run(tmp_path_factory):
    """A finished tiny run; every mistake below is made in it (hydra.run.dir=, resume=) and must leave it as it was."""
    folder = tmp_path_factory.mktemp('existing')
    check(run(['epochs=1', *TINY, 'model.args.depth=1', 'save_model=false', f'hydra.run.dir={folder}/run'],
              cwd=folder))
    empty = folder / 'no_images'
    for split in ('train', 'val'):
        (empty / split / 'cat').mkdir(parents=True)
    return folder


# docs/reliability.md's "Errors and what they mean" table lists these (and the checkpoint cases of
# test_reliability.py). Mistakes in the command line itself are caught by the override check that train.py runs
# before Hydra writes anything; it is called here in-process (train.py's wiring of it: tests/test_cli.py).
@pytest.mark.parametrize('args, message', [
    (['model=no_such_model'], "unknown model 'no_such_model'"),
    (['data=no_such_data'], "unknown data set 'no_such_data'"),
    (['epoch=3'], "did you mean 'epochs'"),
    (['-m', 'model=gka,gkaa', 'shape=fmnist'], "unknown model 'gkaa'"),
    (['batch_size=abc'], "batch_size must be an integer"),
    (['batch_size=0'], 'batch_size must be >= 1'),
    (['epochs=-1'], 'epochs must be >= 1'),
    (['+model.args.sigma_init=0'], 'model.args.sigma_init must be a number > 0'),
    (['+model.args.window=0'], 'model.args.window must be a positive number of tokens'),
    (['nonfinite=maybe'], 'nonfinite must be one of stop, skip'),
    (['hydra.run.dir={tmp}/a_file/run'], 'cannot create the output folder'),
])
def test_command_line_mistakes_give_one_line(tmp_path, capsys, args, message):
    (tmp_path / 'a_file').write_text('not a folder\n')
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        check_overrides(CONF_DIR, 'config', argv=args, validate=validate)
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert os.listdir(tmp_path) == ['a_file']


def test_slurm_launcher_is_there_or_named_in_one_line(tmp_path, capsys):
    import importlib.util
    argv = ['-m', 'hydra/launcher=slurm', f'hydra.sweep.dir={tmp_path}/sweep']
    if importlib.util.find_spec('hydra_plugins.hydra_submitit_launcher') is not None:  # setup.sh's slurm extra
        check_overrides(CONF_DIR, 'config', argv=argv, validate=validate)
        return
    with pytest.raises(SystemExit) as exit_:
        check_overrides(CONF_DIR, 'config', argv=argv, validate=validate)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and 'hydra-submitit-launcher' in lines[0], lines


# Mistakes found by the job itself, after Hydra has written into the run folder: train.py end to end, and the
# existing run folder is put back as it was.
@pytest.mark.parametrize('args, message', [
    (['data.root=/no/such/folder'], 'data.root does not exist'),
    (['data=folder', 'data.root={existing}/no_images'], 'no images found under'),
    (['resume=/no/such/run'], 'resume path does not exist'),
    (['resume={run}', 'model=deit', 'shape=fmnist'], 'is a run of gka_deit_tiny_patch16_224, this run builds deit_tiny'),
    (['resume={run}', 'model.args.depth=2'], 'depth=1 there, 2 here'),
    (['model.name=no_such_timm_model'], "unknown timm model 'no_such_timm_model'"),
])
def test_user_mistakes_give_one_line(existing_run, tmp_path, args, message):
    run_dir = existing_run / 'run'
    args = [a.format(existing=existing_run, run=run_dir) for a in args]
    args.append(f'hydra.run.dir={run_dir}')  # Hydra itself writes .hydra/ and train.log into it
    before = digest(run_dir)
    proc = run(args, cwd=tmp_path, timeout=120)
    one_line_error(proc, message)
    assert digest(run_dir) == before
    assert not os.listdir(tmp_path)  # and no new run folder


def test_model_args_of_an_empty_args_node():
    # Every ImageNet-shape preset has `args: {}`: an empty DictConfig, not a plain dict.
    cfg = OmegaConf.create({'model': {'name': 'gka_deit_small_patch16_224', 'args': {}}, 'data': {'in_chans': 3},
                            'drop_path': 0.1})
    assert recipe.model_args(cfg, 1000) == {'num_classes': 1000, 'in_chans': 3, 'drop_path_rate': 0.1}
    cfg.model.args = {'img_size': 28, 'in_chans': 1}
    assert recipe.model_args(cfg, 10) == {'img_size': 28, 'in_chans': 1, 'num_classes': 10, 'drop_path_rate': 0.1}


def test_unknown_model_lists_every_vit_gka_family():
    names = recipe.vit_gka_models()
    for family in ('gka_deit_', 'vlt_deit_', 'eka_fixed_deit_', 'bka_adaptive_deit_', 'tka_fixed_deit_'):
        assert any(n.startswith(family) for n in names), family
    with pytest.raises(UserError) as e:
        recipe.create_model('no_such_timm_model', {}, None)
    assert all(n in str(e.value) for n in names)
