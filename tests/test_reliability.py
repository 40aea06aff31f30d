"""Reliability: train.py in subprocesses on tiny Fashion-MNIST subsets, on the CPU.

* ``kill -9`` mid-epoch, while a checkpoint is written and between its two renames: the last complete
  checkpoint loads, ``resume=`` finishes, and the per-update losses (steps.jsonl) and final weights equal
  those of an uninterrupted run, step for step;
* a non-finite loss or gradient (injected by the test hook) stops the run in one line, keeping the last good
  checkpoint, or skips the update with ``nonfinite=skip``;
* two processes (gloo) with batch b give what one process with batch 2b gives, in one run folder, and each
  returns its results;
* safe loading: a pickle that would create a file is refused and the file is not created; checkpoints of
  another architecture, with other classes, truncated or not checkpoints give one line, nothing is loaded
  and nothing in their folder changes;
* unreadable images in an ImageFolder are skipped and counted.
"""
import glob
import json
import math
import os
import pathlib

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import (Payload, check, digest, lines, needs_data, one_line_error, popen, run, run_ranks, steps,
                     wait_for)
from vit_gka.train import checkpoint as ckpt
from vit_gka.train import loading
from vit_gka.errors import UserError
from vit_gka.data.datasets import create_dataset
from vit_gka.data.loaders import TrainLoaderSettings, create_train_loader
from vit_gka.train.faults import PAUSE_ENV, POISON_ENV
from vit_gka.train.state import load_checkpoint
from vit_gka.cli import CONF_DIR, compose_option

BASE = ['train_subset=96', 'data.eval_subset=32', 'batch_size=16', 'progress=false', 'model.args.depth=1',
        'save_model=false']
# 6 updates per epoch, 2 epochs; checkpoints after updates 2, 4, 6 (end of epoch 1), 8, 10, 12 (end of epoch 2).
# Every source of randomness in play: drop path (torch RNG), mixup / cutmix (numpy RNG), crops, flips and random
# erasing (per-sample seeds) in a loader worker process.
EXACT = [*BASE, 'epochs=2', 'checkpoint_every_steps=2', 'drop_path=0.1', 'aug.mixup=0.8', 'aug.cutmix=1.0',
         'aug.re_prob=0.25', 'workers=1']
SMALL = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, num_heads=4, num_classes=10)








def kill(proc):
    proc.kill()  # SIGKILL
    proc.wait()


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """The uninterrupted run every killed-and-resumed run must reproduce."""
    folder = tmp_path_factory.mktemp('straight') / 'run'
    check(run([*EXACT, f'hydra.run.dir={folder}'], cwd=folder.parent))
    return folder


def resume_reproduces(straight, run_dir):
    check(run([*EXACT, f'resume={run_dir}', f'hydra.run.dir={run_dir}'], cwd=run_dir.parent))
    assert steps(run_dir) == steps(straight)  # epoch, step, update, loss, lr: every update, exactly
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        a = load_file(straight / 'checkpoints' / 'last' / name)
        b = load_file(run_dir / 'checkpoints' / 'last' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = (json.load(open(d / 'results.json')) for d in (straight, run_dir))
    assert [h['train_loss'] for h in ra['history']] == [h['train_loss'] for h in rb['history']]
    assert ra['top1'] == rb['top1'] and ra['loss'] == rb['loss']
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['last']  # leftovers of the killed write are gone


@needs_data
def test_kill_mid_epoch_then_resume_is_exact(straight, tmp_path):
    run_dir = tmp_path / 'run'
    # The pause in the 3rd checkpoint (end of epoch 1) only makes sure the run is still alive for the kill.
    proc = popen([*EXACT, f'hydra.run.dir={run_dir}'], cwd=tmp_path, env={PAUSE_ENV: 'write@3'})
    try:
        wait_for(lambda: lines(run_dir / 'steps.jsonl') >= 3, proc)  # after update 3, in epoch 1
    finally:
        kill(proc)
    state = load_checkpoint(str(run_dir)).state
    assert state.epoch == 0 and state.step in (2, 4)  # a mid-epoch checkpoint
    resume_reproduces(straight, run_dir)


@needs_data
@pytest.mark.parametrize('stage', ['write', 'swap'])
def test_kill_while_a_checkpoint_is_written(straight, tmp_path, stage):
    run_dir = tmp_path / 'run'
    folder = run_dir / 'checkpoints'
    # The 4th checkpoint (after update 8) replaces the one of the end of epoch 1 (update 6); it pauses
    # after its model.safetensors (write) or between its two renames (swap).
    proc = popen([*EXACT, f'hydra.run.dir={run_dir}'], cwd=tmp_path, env={PAUSE_ENV: f'{stage}@4'})
    paused = {
        'write': lambda: any((p / ckpt.MODEL_FILE).is_file() for p in folder.glob('last.tmp-*')),
        'swap': lambda: (folder / 'last.prev').is_dir() and not (folder / 'last').exists(),
    }[stage]
    try:
        wait_for(lambda: lines(run_dir / 'steps.jsonl') >= 8 and paused(), proc)
    finally:
        kill(proc)
    chk = load_checkpoint(str(run_dir))
    assert chk.folder == str(folder / ('last' if stage == 'write' else 'last.prev'))
    assert (chk.state.epoch, chk.state.step, chk.state.num_updates) == (1, 0, 6)
    resume_reproduces(straight, run_dir)


@needs_data
@pytest.mark.parametrize('kind, message', [('loss', 'non-finite loss nan'),
                                           ('grad', 'non-finite gradient (norm inf)')])
def test_nonfinite_stops_and_keeps_the_last_good_checkpoint(tmp_path, kind, message):
    run_dir = tmp_path / 'run'
    proc = run([*BASE, 'workers=0', 'epochs=1', 'checkpoint_every_steps=2', f'hydra.run.dir={run_dir}'],
               cwd=tmp_path, env={POISON_ENV: f'5:{kind}'})
    one_line_error(proc, f'{message} at epoch 1, step 5 (update 5)', code=3)
    assert f'the last good checkpoint is {run_dir}/checkpoints/last (update 4)' in proc.stderr
    chk = load_checkpoint(str(run_dir))
    assert chk.state.num_updates == 4 and all(torch.isfinite(v).all() for v in chk.model.values())
    assert [r['update'] for r in steps(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / 'results.json').exists()


@needs_data
def test_nonfinite_skip_drops_the_update(tmp_path):
    run_dir = tmp_path / 'run'
    proc = check(run([*BASE, 'workers=0', 'epochs=1', 'nonfinite=skip', f'hydra.run.dir={run_dir}'],
                     cwd=tmp_path, env={POISON_ENV: '5'}))
    assert 'non-finite loss nan at epoch 1, step 5 (update 5); update skipped' in proc.stdout + proc.stderr
    records = steps(run_dir)
    assert [r['skipped'] for r in records] == [False] * 4 + [True, False] and records[4]['loss'] is None
    assert all(math.isfinite(r['loss']) for r in records if not r['skipped'])
    results = json.load(open(run_dir / 'results.json'))
    assert results['nonfinite_skipped'] == 1 and math.isfinite(results['loss'])
    assert all(torch.isfinite(v).all() for v in load_file(run_dir / 'checkpoints/last/model.safetensors').values())




# Two processes see the same samples and augmentations as one with twice the batch (sampling.py), and DDP averages
# their gradients; what differs is float32 rounding: two per-process means of 16 losses averaged by gloo
# instead of one mean of 32, and the gradient sums in another order. Measured: 1e-7 relative on the losses and
# 1.2e-7 absolute on the weights (raw and EMA) after 8 AdamW updates; AdamW divides by sqrt(v), which can
# amplify rounding on tiny gradients, hence about 100x headroom.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


# train.py, with run_training wrapped to record what it returns on each process.
RECORDING_TRAIN_PY = """
import json, os
import vit_gka.train.job as job
from vit_gka.train.main import main

def run_training(cfg, _run=job.run_training):
    results = _run(cfg)
    with open(os.path.join(os.environ['RESULTS_OUT'], 'rank%s.json' % os.environ.get('RANK', '0')), 'w') as f:
        json.dump(results, f)
    return results

job.run_training = run_training
main()
"""


@needs_data
def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    args = ['train_subset=128', 'data.eval_subset=32', 'workers=0', 'progress=false', 'model.args.depth=2',
            'epochs=2', 'save_model=false']
    one = tmp_path / 'one'
    check(run([*args, 'batch_size=32', f'hydra.run.dir={one}'], cwd=tmp_path))
    # two processes as torchrun starts them (helpers.Ranks), gloo on the CPU, train.py recording what each returns,
    # in Hydra's own run dir: both processes write to one folder and return its results.
    recording, returned = tmp_path / 'train_recording.py', tmp_path / 'returned'
    recording.write_text(RECORDING_TRAIN_PY)
    returned.mkdir()
    proc = check(run_ranks([*args, 'batch_size=16'], tmp_path, env={'RESULTS_OUT': str(returned)}, script=recording))
    assert 'global batch 32 = 16 per process x 2 processes x 1 accumulation' in proc.stdout + proc.stderr
    folders = glob.glob(f'{tmp_path}/runs/*/*')
    assert len(folders) == 1, folders  # no stray folder of the second process
    two = pathlib.Path(folders[0])

    a, b = steps(one), steps(two)
    assert [r['update'] for r in a] == [r['update'] for r in b] == list(range(1, 9))
    assert [r['lr'] for r in a] == [r['lr'] for r in b]
    assert [r['loss'] for r in b] == pytest.approx([r['loss'] for r in a], rel=LOSS_RTOL)
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        wa, wb = (load_file(d / 'checkpoints' / 'last' / name) for d in (one, two))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL, name
    ra, rb = (json.load(open(d / 'results.json')) for d in (one, two))
    assert ra['global_batch_size'] == rb['global_batch_size'] == 32
    assert rb['loss'] == pytest.approx(ra['loss'], rel=LOSS_RTOL)
    assert [json.load(open(returned / f'rank{rank}.json')) for rank in (0, 1)] == [rb, rb]


def _craft(folder, case, marker):
    last = folder / 'checkpoints' / 'last'
    if case == 'pickle':
        torch.save({'epoch': 1, 'payload': Payload(str(marker))}, last / ckpt.STATE_FILE)
    elif case == 'architecture':  # 2 blocks: block 0 would load, block 1 is extra
        save_file(timm.create_model('gka_deit_tiny_patch16_224', depth=2, **SMALL).state_dict(),
                  last / ckpt.MODEL_FILE)
    elif case == 'classes':
        save_file(timm.create_model('gka_deit_tiny_patch16_224', depth=1, **{**SMALL, 'num_classes': 7}).state_dict(),
                  last / ckpt.MODEL_FILE)
    elif case in ('truncated weights', 'truncated state'):
        path = last / (ckpt.MODEL_FILE if case == 'truncated weights' else ckpt.STATE_FILE)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case == 'not a checkpoint':
        (last / ckpt.STATE_FILE).write_text('epoch: 1\n')


@needs_data
@pytest.mark.parametrize('case, message', [
    ('pickle', 'refusing to load'),
    ('classes', 'has 7 classes (head.weight [7, 128]), the model 10'),
])
def test_resume_refuses_a_bad_checkpoint_in_one_line(straight, tmp_path, case, message):
    """train.py resume=<bad checkpoint>: one line, the checkpoint folder unchanged, the job's own folder gone, and a
    pickle's payload never run (the other kinds of damage: test_resume_names_each_kind_of_damage)."""
    import shutil
    folder = tmp_path / 'bad'
    shutil.copytree(straight / 'checkpoints', folder / 'checkpoints')
    marker = tmp_path / 'payload_ran'
    _craft(folder, case, marker)
    before = digest(folder)
    proc = run([*EXACT, f'resume={folder}'], cwd=tmp_path)
    one_line_error(proc, message)
    assert digest(folder) == before
    assert not (tmp_path / 'runs').exists()  # the run folder Hydra made for the failed job is gone
    assert not marker.exists()
    if case == 'pickle':  # the payload is live: an unsafe load would have run it
        torch.load(folder / 'checkpoints' / 'last' / ckpt.STATE_FILE, weights_only=False)
        assert marker.exists()


@needs_data
@pytest.mark.parametrize('case, message', [
    ('architecture', 'is another architecture: 11 not in the model (e.g. blocks.1.'),
    ('truncated weights', 'model.safetensors is truncated or not a safetensors file'),
    ('truncated state', 'state.pt is truncated or not a checkpoint'),
    ('not a checkpoint', 'state.pt is truncated or not a checkpoint'),
])
def test_resume_names_each_kind_of_damage(straight, tmp_path, case, message):
    """What resume= reads of a damaged checkpoint, in this process: the checkpoint, then its weights against the
    run's model (as run_training's start does), each kind of damage named."""
    import shutil
    folder = tmp_path / 'bad'
    shutil.copytree(straight / 'checkpoints', folder / 'checkpoints')
    _craft(folder, case, tmp_path / 'payload_ran')
    with pytest.raises(UserError) as e:
        chk = load_checkpoint(str(folder))
        loading.check_weights(timm.create_model('gka_deit_tiny_patch16_224', depth=1, **SMALL), chk.model,
                              f'checkpoint {chk.folder}')
    assert message in str(e.value)


def test_a_mismatch_is_named_before_anything_is_loaded():
    model = timm.create_model('gka_deit_tiny_patch16_224', depth=1, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deeper = timm.create_model('gka_deit_tiny_patch16_224', depth=2, **SMALL).state_dict()
    with pytest.raises(UserError, match=r'another architecture: 11 not in the model \(e.g. blocks\.1\.'):
        loading.check_weights(model, deeper, 'checkpoint')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError):  # what a plain strict load does: copies block 0, then raises
        model.load_state_dict(deeper)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _image_folder(root, bad):
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new('L', (30, 30), 40 * i + (cls == 'dog') * 100).save(root / split / cls / f'{i}.png')
    png = (root / 'train' / 'cat' / '0.png').read_bytes()
    for i in range(bad):
        (root / 'train' / 'dog' / f'bad{i}.png').write_bytes(png[:len(png) // 2] if i % 2 else b'not an image')


@needs_data
def test_unreadable_images_are_skipped_and_counted(tmp_path):
    _image_folder(tmp_path / 'data', bad=2)  # a truncated PNG and a file that is no image
    run_dir = tmp_path / 'run'
    proc = check(run(['data=folder', f'data.root={tmp_path}/data', 'batch_size=5', 'workers=1', 'epochs=1',
                      'progress=false', 'model.args.depth=1', 'save_model=false', f'hydra.run.dir={run_dir}'],
                     cwd=tmp_path))
    out = proc.stdout + proc.stderr
    for i in range(2):
        assert f'unreadable image {tmp_path}/data/train/dog/bad{i}.png' in out
    assert '2 unreadable training images skipped so far' in out
    assert json.load(open(run_dir / 'results.json'))['unreadable_images'] == 2


def test_too_many_unreadable_images_stop_in_one_line(tmp_path):
    from omegaconf import OmegaConf
    _image_folder(tmp_path, bad=25)
    for i in range(4):
        for cls in ('cat', 'dog'):
            os.remove(tmp_path / 'train' / cls / f'{i}.png')
    conf = CONF_DIR
    data = OmegaConf.merge(compose_option('data', 'folder'), {'root': str(tmp_path)})
    aug = OmegaConf.load(os.path.join(conf, 'recipe', 'deit.yaml')).aug
    gray = {'input_size': (1, 28, 28), 'mean': (0.5,), 'std': (0.5,), 'crop_pct': 1.0, 'interpolation': 'bilinear'}
    loader = create_train_loader(create_dataset(data, 'train')[0], gray, TrainLoaderSettings(4, aug, num_workers=1))
    with pytest.raises(UserError) as e:  # raised in the worker process, re-raised here
        next(iter(loader))
    assert str(e.value).startswith('20 unreadable images in a row') and '\n' not in str(e.value)
    assert 'Traceback' not in str(e.value)


def test_older_checkpoints_still_load(tmp_path):
    """A state.pt with only the keys every version wrote, and weights with the ``_orig_mod.`` prefix that compiled
    runs once saved: the state gets TrainState's defaults, the weights timm's names."""
    folder = tmp_path / 'checkpoints' / 'last'
    folder.mkdir(parents=True)
    weights = timm.create_model('gka_deit_tiny_patch16_224', depth=1, **SMALL).state_dict()
    save_file({f'_orig_mod.{k}': v for k, v in weights.items()}, folder / ckpt.MODEL_FILE)
    torch.save({'epoch': 2, 'num_updates': 12, 'optimizer': {}, 'scheduler': {}, 'rng': [],
                'model_name': 'gka_deit_tiny_patch16_224', 'model_args': {'depth': 1}}, folder / ckpt.STATE_FILE)
    chk = load_checkpoint(str(tmp_path))
    assert chk.folder == str(folder) and chk.model.keys() == weights.keys() and chk.ema is None
    state = chk.state
    assert (state.epoch, state.step, state.num_updates, state.epochs, state.history) == (2, 0, 12, None, [])
    assert state.best == {'top1': -1.0, 'epoch': None, 'ema': False}
