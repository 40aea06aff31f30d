"""A run's model/ folder (and its results.json and config.yaml) is read as config.json + model.safetensors only: a pickle there is refused in one line
before any of it runs, by eval.py, the export and publish, on the oldest timm requirements.txt admits too (whose
own ``local-dir:`` loader would unpickle it); a corrupt folder is one line as well. One tiny run serves all."""
import json
import os

import pytest
import torch

from helpers import Payload, ROOT, check, copy_run, needs_data, one_line_error, python
from test_oldest_timm import FOLDER as OLDEST_FOLDER, OLDEST

pytestmark = needs_data
HAS_OLDEST = os.path.isdir(os.path.join(OLDEST_FOLDER, 'timm'))


def _tool(args, oldest=False, cwd=ROOT):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HYDRA_FULL_ERROR': '0'}
    if oldest:
        # that timm's import under this torch warns of torch.jit.interface: not the line under test
        env.update(PYTHONPATH=os.pathsep.join([OLDEST_FOLDER, ROOT]), PYTHONWARNINGS='ignore::FutureWarning')
    return python(args, cwd, env)


def _plant(run_dir, marker):
    """A pickle beside a valid model.safetensors, under the name timm's loader would read."""
    torch.save({'state_dict': {}, 'payload': Payload(str(marker))}, run_dir / 'model' / 'pytorch_model.bin')


@pytest.mark.skipif(not HAS_OLDEST, reason=f'needs timm {OLDEST} in .venv/oldest-timm (bash setup.sh installs it)')
def test_pickle_in_model_folder_refused_on_the_oldest_timm(finished_run, tmp_path):
    run_dir, marker = copy_run(finished_run, tmp_path), tmp_path / 'pwned'
    _plant(run_dir, marker)
    # the tools below import that timm (its version: test_oldest_timm.py), found without importing it
    proc = _tool(['-c', 'import importlib.util; print(importlib.util.find_spec("timm").origin)'], oldest=True)
    assert proc.stdout.strip() == os.path.join(OLDEST_FOLDER, 'timm', '__init__.py')
    proc = _tool(['eval.py', f'run={run_dir}', 'workers=0', f'hydra.run.dir={tmp_path}/h'], oldest=True)
    one_line_error(proc, 'pytorch_model.bin is a pickle')
    proc = _tool(['-m', 'vit_gka.export', str(run_dir), str(tmp_path / 'm.onnx')], oldest=True)
    one_line_error(proc, 'pytorch_model.bin is a pickle')
    assert not marker.exists() and not (run_dir / 'eval.json').exists() and not (tmp_path / 'm.onnx').exists()
    # without the pickle the same folder evaluates on that timm, to the recorded top-1
    os.remove(run_dir / 'model' / 'pytorch_model.bin')
    check(_tool(['eval.py', f'run={run_dir}', 'workers=0', f'hydra.run.dir={tmp_path}/h'], oldest=True))
    out = json.loads((run_dir / 'eval.json').read_text())
    assert out['matches_recorded'] is True


def test_pickle_refused_by_publish_and_a_renamed_one_too(finished_run, tmp_path):
    run_dir, marker = copy_run(finished_run, tmp_path), tmp_path / 'pwned'
    torch.save({'payload': Payload(str(marker))}, run_dir / 'model' / 'weights.data')  # no telling suffix
    proc = _tool(['-m', 'vit_gka.publish', str(run_dir), str(tmp_path / 'hub')])
    one_line_error(proc, 'weights.data is a pickle')
    assert not marker.exists() and not (tmp_path / 'hub').exists()


def test_model_folder_loads_as_timm_local_dir(finished_run):
    import timm

    from vit_gka.train.loading import load_model_folder
    ours = load_model_folder(str(finished_run / 'model')).eval()
    theirs = timm.create_model(f'local-dir:{finished_run}/model', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes', 'label_names'):
        a, b = ours.pretrained_cfg.get(key), theirs.pretrained_cfg.get(key)
        assert (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b), key


@pytest.mark.parametrize('damage,message', [
    ('no_config', 'not a model folder (no config.json)'),
    ('bad_config', 'config.json is not a timm model config'),
    ('truncated', 'model.safetensors is truncated or not a safetensors file'),
    ('results', 'results.json is corrupt'),
    ('config', 'config.yaml is corrupt'),
    ('reshaped', 'has 3 classes (head.bias [3]), the model 10'),
])
def test_corrupt_model_folder_is_one_line(finished_run, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file
    run_dir = copy_run(finished_run, tmp_path)
    model = run_dir / 'model'
    if damage == 'no_config':
        os.remove(model / 'config.json')
    elif damage == 'bad_config':
        (model / 'config.json').write_text('{"architecture": ')
    elif damage == 'results':
        (run_dir / 'results.json').write_text('{"model": "gka_')
    elif damage == 'config':
        (run_dir / 'config.yaml').write_text('data: [unclosed\n')
    elif damage == 'truncated':
        data = (model / 'model.safetensors').read_bytes()
        (model / 'model.safetensors').write_bytes(data[:len(data) // 2])
    else:
        weights = load_file(model / 'model.safetensors')
        weights['head.bias'] = torch.zeros(3)
        save_file(weights, model / 'model.safetensors')
    proc = _tool(['eval.py', f'run={run_dir}', 'workers=0', f'hydra.run.dir={tmp_path}/h'])
    one_line_error(proc, message)
    assert not (run_dir / 'eval.json').exists()
