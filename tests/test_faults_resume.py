"""A resume onto another seed, data set or subset is refused in one line; state.pt carries a format version (a newer
one is refused, an older one without it still loads); an edited state.pt is one line, not a traceback."""
import os
import shutil

import pytest
import torch
from PIL import Image

from helpers import TINY, check, digest, needs_data, one_line_error, run
from vit_gka.errors import UserError
from vit_gka.train.state import FORMAT, load_checkpoint

pytestmark = needs_data

ARGS = ['epochs=2', *TINY, 'train_subset=64', 'data.eval_subset=32', 'model.args.depth=1']


@pytest.fixture(scope='module')
def stopped(tmp_path_factory):
    """A run stopped after its first epoch (checkpoints/last at update 2)."""
    folder = tmp_path_factory.mktemp('faults_resume') / 'run'
    check(run([*ARGS, 'stop_epoch=1', f'hydra.run.dir={folder}'], cwd=folder.parent))
    return folder


def _ten_classes(root):
    for split in ('train', 'val'):
        for c in range(10):
            os.makedirs(root / split / f'c{c}')
            Image.new('L', (28, 28), color=20 * c).save(root / split / f'c{c}' / '0.png')
    return root


@pytest.mark.parametrize('change, message', [
    (['seed=1'], 'trained with seed=0, this run has seed=1; resume with seed=0'),
    (['train_subset=32'], 'trained with train_subset=64, this run has train_subset=32'),
    (['data=folder', 'data.root={data}', 'data.in_chans=1'], 'trained with data=fashion_mnist, this run has data=folder'),
])
def test_resume_onto_other_data_or_seed_is_refused(stopped, tmp_path, change, message):
    data = _ten_classes(tmp_path / 'data')
    before = digest(stopped)
    change = [c.format(data=data) for c in change]
    proc = run([*ARGS, *change, f'resume={stopped}', f'hydra.run.dir={tmp_path}/new'], cwd=tmp_path, timeout=120)
    one_line_error(proc, message)
    assert digest(stopped) == before and not (tmp_path / 'new').exists()


def _edited(stopped, tmp_path, edit):
    folder = tmp_path / 'last'
    shutil.copytree(stopped / 'checkpoints' / 'last', folder)
    record = torch.load(folder / 'state.pt', weights_only=True)
    assert record['format'] == FORMAT and record['data'] == 'fashion_mnist' and record['train_subset'] == 64
    edit(record)
    torch.save(record, folder / 'state.pt')
    return folder


def test_state_format_newer_refused_older_loads(stopped, tmp_path):
    newer = _edited(stopped, tmp_path / 'a', lambda r: r.update(format=FORMAT + 1))
    with pytest.raises(UserError, match=f'is of format {FORMAT + 1}, written by a newer vit-gka'):
        load_checkpoint(str(newer))
    older = _edited(stopped, tmp_path / 'b', lambda r: [r.pop(k) for k in ('format', 'data', 'train_subset')])
    chk = load_checkpoint(str(older))
    assert chk.state.num_updates == 2 and chk.state.data is None


@pytest.mark.parametrize('edit', [
    lambda r: r.update(epoch='one'),
    lambda r: r.update(num_updates=-3),
    lambda r: r.update(history=None),
    lambda r: r.update(format='2'),
], ids=['epoch_text', 'negative_updates', 'history_none', 'format_text'])
def test_edited_state_is_one_line(stopped, tmp_path, edit):
    folder = _edited(stopped, tmp_path, edit)
    with pytest.raises(UserError) as error:
        load_checkpoint(str(folder))
    assert 'state.pt is' in str(error.value) and '\n' not in str(error.value)
