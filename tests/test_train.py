"""train.py end to end on tiny Fashion-MNIST subsets (CPU): exact resume, a compiled run's model, and one-line
errors for user mistakes that leave an existing run folder as it was; the recipe's model arguments and
unknown-model message (a sweep and its run folders: test_report.py). The helpers are tests/helpers.py."""
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
