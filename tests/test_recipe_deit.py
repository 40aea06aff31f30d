"""The GPU recipe, on the CPU: ``recipe=deit`` and the settings a GPU run turns on, run together on real JPEGs.

* The documented ImageNet command (``train.py model=<family> shape=<tiny|small> data=imagenet data.root=<folder>
  recipe=deit``, and ``experiment=paper_gka_ti``) for every ImageNet-shape family (GKA, DeiT, VLT, a compact
  kernel) on an ImageNet-layout folder of 20 real ImageNet JPEGs (PyPI foolbox's, tests/helpers.py), shrunk to
  one block, 16 images and one epoch (about 5 s each);
* everything at once, at 224 x 224 (one block of DeiT-Ti width): torch.compile, bf16 autocast, gradient
  accumulation, mixup + cutmix, RandAugment, random erasing, drop path, EMA, repeated augmentation x3 over 2
  processes (gloo, started as torchrun starts them) with 2 loader workers each, mid-epoch checkpoints, ``kill -9``
  and ``resume=``; then eval.py reloads ``model/`` through ``local-dir:`` and reproduces the run's numbers, and
  every weights file has timm's key names (about 2 min with a cold torch.compile cache, most of it compiling;
  ``-m slow`` adds the uninterrupted run that the resumed one must equal exactly);
* the pieces in-process: repeated augmentation's sampler with the per-sample seeds over 2 ranks, bf16 autocast
  with every attention family, the short last group of gradient accumulation, the one-line errors of an odd
  batch with mixup and of a ``model.args`` key an ImageNet shape does not have.
"""
import json
import os
import time

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler

from helpers import check, imagenet_folder, needs_jpegs, run, run_ranks, script, start_ranks, steps
from vit_gka import evaluate as evaluation
from vit_gka.train import checkpoint as ckpt
from vit_gka.train.faults import PAUSE_ENV
from vit_gka.cli import check_overrides
from vit_gka.cli import CONF_DIR
from vit_gka.train.state import load_checkpoint
from vit_gka.train.validation import validate

@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    """<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG: 20 real ImageNet images, 19 classes."""
    return imagenet_folder(str(tmp_path_factory.mktemp('imagenet')))


def _results(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


# ------------------------------------------------------------------------- the documented ImageNet command


# CI size: one block, 16 training and 8 test images, one epoch; everything else as the command gives it
# (recipe=deit: RandAugment, mixup / cutmix, random erasing, drop path 0.1, EMA, lr 5e-4 per 512, ...).
CI_SIZE = ['epochs=1', 'train_subset=16', 'data.eval_subset=8', 'batch_size=4', '+model.args.depth=1', 'workers=0',
           'progress=false']
IMAGENET = ['data=imagenet', 'recipe=deit']


@pytest.mark.parametrize('command, name, attention', [
    (['experiment=paper_gka_ti'], 'gka_deit_tiny_patch16_224', 'GaussianKernelAttention'),
    (['model=gka', 'shape=small', *IMAGENET], 'gka_deit_small_patch16_224', 'GaussianKernelAttention'),
    (['model=deit', 'shape=tiny', *IMAGENET], 'deit_tiny_patch16_224', 'Attention'),
    (['model=vlt', 'shape=small', *IMAGENET], 'vlt_deit_small_patch16_224', 'ValueFreeAttention'),
    (['model=eka_fixed', 'shape=tiny', *IMAGENET], 'eka_fixed_deit_tiny_patch16_224', 'KernelAttention'),
], ids=['paper_gka_ti', 'gka_small', 'deit_tiny', 'vlt_small', 'eka_fixed_tiny'])
@needs_jpegs
def test_documented_imagenet_command(jpegs, tmp_path, command, name, attention):
    run_dir = tmp_path / 'run'
    proc = check(run([*command, f'data.root={jpegs}', *CI_SIZE, f'hydra.run.dir={run_dir}'], cwd=tmp_path))
    log = proc.stdout + proc.stderr
    assert 'data imagenet (16 train / 8 test images, 1000 classes, transformed per sample, 0 loader workers per process), input (3, 224, 224)' in log
    assert 'global batch 4 = 4 per process x 1 processes x 1 accumulation' in log

    res = _results(run_dir)
    assert res['model'] == name and res['data'] == 'imagenet' and res['num_classes'] == 1000
    assert res['img_size'] == 224 and res['epochs_done'] == 1 and res['mixed_precision'] == 'no'
    assert res['model_args'] == {'depth': 1, 'num_classes': 1000, 'in_chans': 3, 'drop_path_rate': 0.1}
    assert all(torch.isfinite(torch.tensor(h['train_loss'])) for h in res['history'])
    assert (res['sparsity'] is None) == (attention in ('Attention', 'ValueFreeAttention'))
    cfg = (run_dir / 'config.yaml').read_text()  # the DeiT recipe was in force, not the quickstart's
    for line in ("auto_augment: rand-m9-mstd0.5-inc1", 'mixup: 0.8', 'cutmix: 1.0', 're_prob: 0.25',
                 'repeated_aug: 3', 'decay: 0.99996', 'drop_path: 0.1'):
        assert line in cfg, line

    # The exported model: timm's own loader, ImageNet's preprocessing; DeiT's evaluation crop for every family
    # (data=imagenet sets it: timm's own deit_* configs say 0.9, and this run is compared with GKA's at 0.875).
    model = timm.create_model(f'local-dir:{run_dir}/model', pretrained=True)
    assert type(model.blocks[0].attn).__name__ == attention and len(model.blocks) == 1
    assert model.num_classes == 1000
    data_config = resolve_data_config({}, model=model)
    assert data_config['input_size'] == (3, 224, 224) and tuple(data_config['mean']) == IMAGENET_DEFAULT_MEAN
    assert data_config['interpolation'] == 'bicubic' and data_config['crop_pct'] == 0.875

# ------------------------------------------------------------------------------ the GPU recipe, all at once


# A GPU run's settings on a 2-core CPU: 2 processes of batch 2 with 2 micro-batches per update (global batch 8),
# repeated augmentation x3 (timm's RepeatAugSampler: 10 of the 20 images per process and epoch, 5 batches,
# 3 updates), 2 loader workers per process, a checkpoint after every update. 224 x 224 as the paper; one block
# keeps the steps short (the time goes to torch.compile). eval_batch_size=5 splits each process's 10 test
# images evenly: no second compiled shape for a shorter last batch.
GPU_RECIPE = ['model=gka', 'shape=tiny', 'data=folder', 'recipe=deit', 'epochs=2', '+model.args.depth=1',
              'batch_size=2', 'eval_batch_size=5', 'grad_accum=2', 'compile=true', 'mixed_precision=bf16',
              'workers=2', 'checkpoint_every_steps=1', 'progress=false']
UPDATES = [(1, 2, 1), (1, 4, 2), (1, 5, 3), (2, 2, 4), (2, 4, 5), (2, 5, 6)]  # (epoch, step, update)


@pytest.fixture(scope='module')
def gpu_recipe_run(jpegs, tmp_path_factory):
    """The GPU recipe on 2 processes (as torchrun starts them, helpers.Ranks) killed (SIGKILL to both and their
    loader workers) during its 2nd checkpoint write, mid-epoch 1, then resumed in place: (run dir, the resumed run's output, the data root).
    Killed before the first evaluation, the run compiles each graph cold once: training in the killed job,
    evaluation in the resumed one (which finds training's compiled in the cache)."""
    run_dir = tmp_path_factory.mktemp('gpu_recipe') / 'run'
    args = [*GPU_RECIPE, f'data.root={jpegs}', f'hydra.run.dir={run_dir}']
    # The main process pauses in its 2nd checkpoint write (after update 2, model.safetensors written into the
    # temporary folder): the kill then surely comes mid-epoch, with update 1's checkpoint the last complete one.
    def paused():
        return (os.path.isfile(run_dir / 'steps.jsonl') and (run_dir / 'steps.jsonl').read_text().count('\n') >= 2
                and any((p / ckpt.MODEL_FILE).is_file() for p in (run_dir / 'checkpoints').glob('last.tmp-*')))

    ranks = start_ranks(args, run_dir.parent, env={PAUSE_ENV: 'write@2'})
    try:
        deadline = time.time() + 240
        while not paused():
            assert ranks.poll() is None, ranks.output()[1][-5000:]
            assert time.time() < deadline, 'timed out waiting for the 2nd checkpoint'
            time.sleep(0.05)
    finally:  # as a cluster's kill: every process
        ranks.kill()
        ranks.wait()
    state = load_checkpoint(str(run_dir)).state
    assert (state.epoch, state.step, state.num_updates) == (0, 2, 1)  # mid-epoch 1
    resumed = check(run_ranks([*args, f'resume={run_dir}'], run_dir.parent))
    return run_dir, resumed.stdout + resumed.stderr, jpegs


@needs_jpegs
def test_gpu_recipe_on_the_cpu(gpu_recipe_run):
    run_dir, log, _ = gpu_recipe_run
    assert 'resumed from' in log and 'at epoch 1, step 2 (after 1 updates)' in log
    assert 'global batch 8 = 2 per process x 2 processes x 2 accumulation' in log and 'mixed precision bf16' in log
    assert 'data folder (20 train / 20 test images, 19 classes, transformed per sample, 2 loader workers per process), input (3, 224, 224)' in log
    assert [(s['epoch'], s['step'], s['update']) for s in steps(run_dir)] == UPDATES  # carried over, then resumed
    assert all(not s['skipped'] and torch.isfinite(torch.tensor(s['loss'])) for s in steps(run_dir))
    res = _results(run_dir)
    assert res['epochs_done'] == 2 and res['mixed_precision'] == 'bf16' and res['global_batch_size'] == 8
    assert res['num_classes'] == 19 and res['img_size'] == 224 and res['nonfinite_skipped'] == 0

    # Every weights file has timm's key names: no compile wrapper (_orig_mod.), no DDP (module.).
    keys = set(timm.create_model('gka_deit_tiny_patch16_224', depth=1, num_classes=19).state_dict())
    for name in ('checkpoints/last/model.safetensors', 'checkpoints/last/model_ema.safetensors', 'best.safetensors',
                 'model/model.safetensors'):
        assert set(load_file(run_dir / name)) == keys, name

    # eval.py: model/ through local-dir:, on the run's own data, under the run's bf16 autocast, reproduces the
    # run's last evaluation (top-1 and the loss itself: in float32 the loss would differ in the 6th digit).
    proc = script('eval.py', [f'run={run_dir}', 'workers=0', f'hydra.run.dir={run_dir}/eval_hydra'], cwd=run_dir.parent,
                  env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((run_dir / 'eval.json').read_text())
    assert out['weights'] == f'{run_dir}/model' and out['mixed_precision'] == 'bf16' and out['num_images'] == 20
    assert out['matches_recorded'] is True and 'same' in proc.stdout
    recorded = res['ema_top1'] if res['model_folder_weights'] == 'ema' else res['top1']
    assert out['top1'] == recorded and out['loss'] == pytest.approx(res['loss'], rel=1e-9, abs=0)

    # The EMA of the checkpoint, read back by eval.py (in-process), gives the run's EMA top-1.
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        cfg = compose('eval', overrides=['workers=0', f'run={run_dir}', f'ckpt={run_dir}/checkpoints/last',
                                         'weights=ema'])
    ema = evaluation.evaluate_model(cfg, str(run_dir), evaluation.run_config(str(run_dir)).data)
    assert ema['top1'] == res['ema_top1'] and ema['mixed_precision'] == 'bf16'


@pytest.mark.slow
@needs_jpegs
def test_gpu_recipe_resume_is_exact(gpu_recipe_run, tmp_path):
    # The same run without the kill: every update's loss and lr, and the final weights, equal bit for bit.
    run_dir, _, root = gpu_recipe_run
    straight = tmp_path / 'straight'
    check(run_ranks([*GPU_RECIPE, f'data.root={root}', f'hydra.run.dir={straight}'], tmp_path))
    assert steps(straight) == steps(run_dir)
    for name in ('checkpoints/last/model.safetensors', 'checkpoints/last/model_ema.safetensors',
                 'model/model.safetensors'):
        a, b = load_file(straight / name), load_file(run_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = _results(straight), _results(run_dir)
    assert (ra['top1'], ra['top5'], ra['loss'], ra['ema_top1']) == (rb['top1'], rb['top5'], rb['loss'], rb['ema_top1'])

# ------------------------------------------------------------------------------------------ the pieces


@needs_jpegs
def test_repeated_augmentation_over_two_processes(jpegs):
    # What each of 2 processes loads with recipe=deit's repeated augmentation x3: timm's RepeatAugSampler under
    # the seeded wrapper (sampling.py). Every repeat of an image is a differently augmented view (its own seed,
    # from its global position), the same position gives the same view again (what makes resume exact), and an
    # epoch is 10 samples per process (DeiT: the data set's length over the processes, repeats included).
    from hydra import compose, initialize_config_dir
    from vit_gka.data.datasets import create_dataset
    from vit_gka.data.loaders import TrainLoaderSettings, create_train_loader
    from vit_gka.data.sampling import set_loader_epoch
    with initialize_config_dir(CONF_DIR, version_base='1.3'):
        cfg = compose('config', overrides=['recipe=deit', 'data=folder', f'data.root={jpegs}'])
    dataset, _ = create_dataset(cfg.data, 'train')
    data_config = {'input_size': (3, 64, 64), 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN,
                   'std': (0.229, 0.224, 0.225), 'crop_pct': 0.875}
    views = {}  # image index -> its augmented views, over both processes
    for rank in (0, 1):
        loader = create_train_loader(dataset, data_config, TrainLoaderSettings(
            2, cfg.aug, drop_last=True, num_replicas=2, rank=rank, repeated_aug=int(cfg.repeated_aug), seed=0))
        assert isinstance(loader.sampler.sampler, RepeatAugSampler) and len(loader.sampler) == 10
        set_loader_epoch(loader, 0, rank)
        items = list(loader.sampler)  # (index, seed) per position
        loaded = [loader.dataset[item][0] for item in items]
        for (index, _), image in zip(items, loaded):
            views.setdefault(index, []).append(image)
        assert torch.equal(loader.dataset[items[-1]][0], loaded[-1])  # loaded again: the same view
    assert sum(len(v) for v in views.values()) == 20 and max(len(v) for v in views.values()) == 3
    for index, images in views.items():
        for i in range(len(images)):
            for j in range(i):
                assert not torch.equal(images[i], images[j]), f'image {index}: two repeats, one augmentation'


@pytest.mark.parametrize('family', ['gka', 'deit', 'vlt', 'eka_fixed', 'eka_adaptive', 'bka_adaptive', 'tka_fixed'])
def test_bf16_autocast_every_family(family):
    # What mixed_precision=bf16 does on the CPU (Accelerate's torch.autocast): GKA's fused SDPA backends and the
    # compact kernels (dense, entmax) run under it, forward and backward, close to float32. Measured: logits within
    # 0.006, gradient cosine 0.9999 at DeiT-Ti width, 224 x 224.
    name = 'deit_tiny_patch16_224' if family == 'deit' else f'{family}_deit_tiny_patch16_224'
    torch.manual_seed(0)
    model = timm.create_model(name, depth=1, num_classes=19)
    images = torch.randn(4, 3, 224, 224)
    logits, grads = {}, {}
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        out.float().logsumexp(-1).mean().backward()
        logits[bf16] = out.float()
        grads[bf16] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads[True]).all()
    assert (logits[True] - logits[False]).abs().max() < 0.05
    assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.999


class _Accumulating:
    """What loop.train_one_epoch uses of Accelerate's Accelerator (one process), with its gradient accumulation:
    ``backward`` divides every micro-batch loss by ``gradient_accumulation_steps``, as Accelerator.backward does."""
    device, num_processes, is_main_process, scaler = torch.device('cpu'), 1, True, None

    def __init__(self, steps):
        self.gradient_accumulation_steps = steps

    def backward(self, loss):
        (loss / self.gradient_accumulation_steps).backward()


def test_a_short_last_accumulation_group_is_a_mean_too():
    # grad_accum=2 over an epoch of 3 micro-batches: updates of 2 and 1. Each update's gradient is the mean over
    # its own micro-batches; the lone last one was halved (its loss divided by 2, as if it had a partner).
    from types import SimpleNamespace
    from vit_gka.train.loop import train_one_epoch
    batches = [(torch.tensor([[1.0]]), torch.tensor([[t]])) for t in (1.0, 3.0, 5.0)]
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    parts = SimpleNamespace(accelerator=_Accumulating(2), model=model, raw_model=model, model_ema=None,
                            optimizer=optimizer, lr_scheduler=SimpleNamespace(step_update=lambda num_updates: None),
                            loss_fn=torch.nn.functional.mse_loss, mixup_fn=None, clip_grad=None, nonfinite='stop',
                            log_interval=100, progress=False)
    state = SimpleNamespace(step=0, num_updates=0, totals=None)
    train_one_epoch(parts, state, 0, batches)
    w = 0.0
    for group in ([1.0, 3.0], [5.0]):  # d/dw (w - t)^2 = 2 (w - t), averaged over the update's micro-batches
        w -= 0.25 * sum(2 * (w - t) for t in group) / len(group)
    assert state.num_updates == 2 and model.weight.item() == pytest.approx(w, abs=1e-6)


@pytest.mark.parametrize('args, message', [
    # timm's Mixup asserts an even batch: this stopped the run at its first step with an AssertionError.
    (['recipe=deit', 'batch_size=3'], "batch_size must be even with aug.mixup and aug.cutmix on (timm's Mixup "
                                      "mixes pairs of images), got 3; set batch_size=4 or aug.mixup=0 aug.cutmix=0"),
    (['batch_size=5', 'aug.cutmix_minmax=[0.2,0.8]'], 'set batch_size=6 or aug.cutmix_minmax=null'),
    # ImageNet shapes have `args: {}`: a new create_model argument needs the '+' (the hint named 'model' before).
    (['model=gka', 'shape=tiny', 'model.args.depth=1'],
     "Could not override 'model.args.depth'. (model.args has only the keys that this shape= sets; a new "
     "create_model argument takes a '+': +model.args.depth=1)"),
])
def test_command_line_mistakes_of_the_recipe(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        check_overrides(CONF_DIR, 'config', argv=[*args, f'hydra.run.dir={tmp_path}/run'], validate=validate)
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert not os.listdir(tmp_path)
