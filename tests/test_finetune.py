"""finetune=<run | weights file | timm name> with recipe=finetune (vit_gka/train/finetune.py): a Fashion-MNIST GKA
fine-tuned at another image size (28 -> 56 px) and on another data set with another number of classes (a 5-class
folder) starts better than the same training from scratch; position embeddings / patch embedding resampled, the
classifier dropped only when the classes differ, log_sigma kept; mistakes end in one line."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from helpers import ROOT, check, needs_data, one_line_error, python, run

pytestmark = needs_data
COMMON = ['epochs=1', 'batch_size=64', 'model.args.depth=2', 'workers=0', 'progress=false', 'data.eval_subset=256']


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A quick Fashion-MNIST GKA (3 short epochs: about 50% top-1)."""
    run_dir = tmp_path_factory.mktemp('pretrained') / 'run'
    check(run(['epochs=3', 'train_subset=4096', 'data.eval_subset=256', 'model.args.depth=2', 'workers=0',
               'progress=false', f'hydra.run.dir={run_dir}'], cwd=run_dir.parent))
    return run_dir


def _top1(run_dir):
    return json.loads((run_dir / 'results.json').read_text())['history'][0]['top1']


def test_higher_resolution_starts_from_the_trained_model(pretrained, tmp_path):
    # 28 -> 56 px with patch 14: the same 4 x 4 grid, the patch embedding resampled from 7 x 7 (timm's filter)
    args = ['recipe=finetune', *COMMON, 'train_subset=512', 'model.args.img_size=56', 'model.args.patch_size=14']
    tuned, scratch = tmp_path / 'tuned', tmp_path / 'scratch'
    proc = check(run([*args, f'finetune={pretrained}', f'hydra.run.dir={tuned}'], cwd=tmp_path))
    assert f'fine-tuning from {pretrained}: 30 tensors loaded, its classifier' in proc.stdout + proc.stderr
    check(run([*args, f'hydra.run.dir={scratch}'], cwd=tmp_path))
    assert _top1(tuned) > _top1(scratch) + 20  # measured: about 54 against 11
    before = load_file(pretrained / 'model' / 'model.safetensors')
    after = load_file(tuned / 'checkpoints' / 'last' / 'model.safetensors')
    assert after['pos_embed'].shape == before['pos_embed'].shape  # 1 + 4 x 4 tokens either way
    assert after['patch_embed.proj.weight'].shape[-1] == 14 and before['patch_embed.proj.weight'].shape[-1] == 7
    # lr 5e-6 for one short epoch: the bandwidths are the trained ones, not a fresh init
    assert (after['blocks.0.attn.log_sigma'] - before['blocks.0.attn.log_sigma']).abs().max() < 1e-3


def test_another_data_set_with_five_classes_gets_a_new_classifier(pretrained, tmp_path):
    folder = tmp_path / 'five'
    check(python(['-m', 'benchmarks.fmnist_folder', str(folder), '--size', '28', '--train-per-class', '100',
                  '--val-per-class', '40', '--workers', '2'], ROOT))
    for split in ('train', 'val'):
        for name in sorted(os.listdir(folder / split))[5:]:
            shutil.rmtree(folder / split / name)
    args = ['recipe=finetune', 'lr=5e-4', *COMMON, 'data=folder', f'data.root={folder}']  # a new head: a higher lr
    tuned, scratch = tmp_path / 'tuned', tmp_path / 'scratch'
    proc = check(run([*args, f'finetune={pretrained / "model"}', f'hydra.run.dir={tuned}'], cwd=tmp_path))
    assert 'tensors loaded, a new classifier' in proc.stdout + proc.stderr
    check(run([*args, f'hydra.run.dir={scratch}'], cwd=tmp_path))
    assert json.loads((tuned / 'results.json').read_text())['num_classes'] == 5
    assert _top1(tuned) > _top1(scratch)


def test_finetune_mistakes_give_one_line(pretrained, tmp_path):
    base = ['recipe=finetune', *COMMON, 'train_subset=64']
    one_line_error(run([*base, f'finetune={tmp_path}/nothing', f'hydra.run.dir={tmp_path}/a'], cwd=tmp_path),
                   'neither a file or folder nor a timm model name')
    one_line_error(run([*base, 'model=deit', f'finetune={pretrained}', f'hydra.run.dir={tmp_path}/b'], cwd=tmp_path),
                   'another architecture')
    offline = run(['recipe=finetune', 'epochs=1', 'train_subset=8', 'data.eval_subset=8', 'batch_size=8', 'workers=0',
                   'model=deit', 'shape=small', '+model.args.depth=1', 'finetune=deit_small_patch16_224',
                   f'hydra.run.dir={tmp_path}/c'], cwd=tmp_path)  # offline: conftest.py
    one_line_error(offline, 'finetune=deit_small_patch16_224: could not load its published weights')
