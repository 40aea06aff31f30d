"""data=timm data.name=wds/<name>: WebDataset shards the tests write, read by timm's ReaderWds (streaming.py)."""
import io
import json
import re
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from helpers import check, run, script
from test_data import data_cfg
from vit_gka.data.datasets import create_dataset
from vit_gka.data.loaders import TrainLoaderSettings, create_eval_loader, create_train_loader
from vit_gka.data.sampling import set_loader_epoch
from vit_gka.errors import UserError

pytest.importorskip('webdataset')

SHARDS, PER_SHARD = {'train': 4, 'validation': 2}, 6
GRAY = {'input_size': (1, 28, 28), 'mean': (0.0,), 'std': (1.0,), 'crop_pct': 1.0, 'interpolation': 'nearest'}
AUG_NONE = OmegaConf.create({'no_aug': True, 'scale': None, 'ratio': None, 'hflip': 0.0, 'vflip': 0.0,
                             'color_jitter': 0.0, 'auto_augment': None, 're_prob': 0.0, 're_mode': 'pixel',
                             're_count': 1, 'interpolation': None})


def write_shards(folder):
    """<folder>/_info.json and <split>-<k>.tar: PNG + .cls samples whose grey level (7 * index + 5) names
    them, class index % 2."""
    from PIL import Image
    info = {'name': 'tiny', 'splits': {}}
    index = 0
    for split, shards in SHARDS.items():
        names = []
        for k in range(shards):
            name = f'{split}-{k:04d}.tar'
            with tarfile.open(folder / name, 'w') as tar:
                for _ in range(PER_SHARD):
                    png = io.BytesIO()
                    Image.new('L', (28, 28), 7 * index + 5).save(png, format='PNG')
                    for ext, payload in (('png', png.getvalue()), ('cls', str(index % 2).encode())):
                        member = tarfile.TarInfo(f'{index:06d}.{ext}')
                        member.size = len(payload)
                        tar.addfile(member, io.BytesIO(payload))
                    index += 1
            names.append(name)
        info['splits'][split] = {'name': split, 'num_samples': shards * PER_SHARD, 'filenames': names,
                                 'shard_lengths': [PER_SHARD] * shards}
    (folder / '_info.json').write_text(json.dumps(info))
    return folder


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp('wds'))


def wds_cfg(root, **kw):
    return data_cfg('timm', name='wds/tiny', root=str(root), in_chans=1, num_classes=2, **kw)


def sample_ids(images):
    return [round((float(v) * 255 - 5) / 7) for v in images[:, 0, 0, 0]]


def epoch_ids(loader, epoch):
    set_loader_epoch(loader, epoch)
    return [i for images, _ in loader for i in sample_ids(images)]


def test_processes_read_disjoint_shards_and_every_epoch_its_own_order(shards):
    dataset, num_classes = create_dataset(wds_cfg(shards), 'train')
    assert num_classes == 2 and len(dataset) == 24
    loaders = [create_train_loader(create_dataset(wds_cfg(shards), 'train')[0], GRAY,
                                   TrainLoaderSettings(3, AUG_NONE, num_workers=0, num_replicas=2, rank=rank, seed=5))
               for rank in (0, 1)]
    assert [len(loader) for loader in loaders] == [4, 4]  # 12 samples each: whole batches
    ids = [epoch_ids(loader, 0) for loader in loaders]
    assert sorted(ids[0] + ids[1]) == list(range(24))  # each sample once, on one process
    # every shard goes whole to one process
    assert {i // PER_SHARD for i in ids[0]}.isdisjoint({i // PER_SHARD for i in ids[1]})
    again = create_train_loader(create_dataset(wds_cfg(shards), 'train')[0], GRAY,
                                TrainLoaderSettings(3, AUG_NONE, num_workers=0, num_replicas=2, rank=0, seed=5))
    assert epoch_ids(again, 0) == ids[0]  # (seed, epoch) fixes the order
    assert sorted(epoch_ids(loaders[0], 3) + epoch_ids(loaders[1], 3)) == list(range(24))


def test_loader_workers_split_the_shards_and_eval_reads_every_sample_once(shards):
    loader = create_train_loader(create_dataset(wds_cfg(shards), 'train')[0], GRAY,
                                 TrainLoaderSettings(4, AUG_NONE, num_workers=2, seed=1, subset=16))
    ids = epoch_ids(loader, 0)
    assert len(loader) == 4 and len(ids) == 16 and len(set(ids)) == 16 and max(ids) < 24
    eval_loader, _ = create_eval_loader(wds_cfg(shards), GRAY, batch_size=5, num_workers=0)
    targets = torch.cat([t for _, t in eval_loader])
    ids = [i for images, _ in eval_loader for i in sample_ids(images)]
    assert ids == list(range(24, 36)) and targets.tolist() == [i % 2 for i in ids]


def test_one_line_refusals(shards, tmp_path):
    dataset, _ = create_dataset(wds_cfg(shards), 'train')
    cases = [
        (lambda: create_train_loader(dataset, GRAY, TrainLoaderSettings(2, AUG_NONE, num_workers=3, num_replicas=2)),
         '4 training shards cannot feed 2 process(es) x 3 loader worker(s)'),
        (lambda: create_train_loader(dataset, GRAY, TrainLoaderSettings(2, AUG_NONE, num_replicas=2, repeated_aug=3)),
         'set repeated_aug=0'),
        (lambda: create_eval_loader(wds_cfg(shards, eval_subset=4), GRAY, 2), 'set data.eval_subset=null'),
        (lambda: create_dataset(wds_cfg(tmp_path / 'none'), 'train'), 'not a folder'),
        (lambda: create_dataset(wds_cfg(tmp_path), 'train'), '_info.json listing'),
        (lambda: create_dataset(data_cfg('timm', name='hfids/x', root=str(tmp_path)), 'train'), 'use wds/'),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as e:
            call()
        assert '\n' not in str(e.value)


def test_train_py_on_webdataset_shards_stops_and_resumes(shards, tmp_path):
    """Two epochs in two jobs (stop_epoch=1, then resume=auto), a loader worker, the data wait recorded."""
    run_dir = tmp_path / 'run'
    args = ['data=timm', 'data.name=wds/tiny', f'data.root={shards}', 'data.num_classes=2', 'data.in_chans=1',
            'epochs=2', 'batch_size=4', 'workers=1', 'progress=false', 'model.args.depth=1', 'log_with=none',
            f'hydra.run.dir={run_dir}', 'resume=auto']
    first = check(run(args + ['stop_epoch=1'], cwd=tmp_path))
    assert 'transformed per sample, 1 loader workers' in first.stdout + first.stderr
    check(run(args, cwd=tmp_path))
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['data'] == 'wds/tiny' and results['num_classes'] == 2 and results['epochs_done'] == 2
    assert 0.0 <= results['data_wait_fraction'] < 1.0
    steps = [json.loads(line) for line in (run_dir / 'steps.jsonl').read_text().splitlines()]
    assert [s['update'] for s in steps] == list(range(1, 13))  # 24 samples / 4 a batch, per epoch


def test_two_processes_on_webdataset_shards_evaluate_every_test_image_once(shards, tmp_path):
    """2 processes (as torchrun starts them): each trains on its own shards; Accelerate shards the test stream (read
    whole by the reader) and the run's top-1 is eval.py's on one process, image for image."""
    from helpers import ROOT, run_ranks
    run_dir = tmp_path / 'run'
    check(run_ranks(['data=timm', 'data.name=wds/tiny', f'data.root={shards}', 'data.num_classes=2', 'data.in_chans=1',
               'epochs=1', 'batch_size=4', 'workers=0', 'progress=false', 'model.args.depth=1', 'log_with=none',
               f'hydra.run.dir={run_dir}'], tmp_path))
    steps = [json.loads(line) for line in (run_dir / 'steps.jsonl').read_text().splitlines()]
    assert [s['update'] for s in steps] == [1, 2, 3]  # 24 samples / (2 processes x 4)
    assert json.loads((run_dir / 'results.json').read_text())['test_images'] == 12
    check(script('eval.py', [f'run={run_dir}', 'workers=0', f'hydra.run.dir={tmp_path}/eval_hydra'], cwd=ROOT))
    out = json.loads((run_dir / 'eval.json').read_text())
    assert out['num_images'] == 12 and out['matches_recorded'] is True, out
