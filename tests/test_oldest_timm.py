"""A run's ``model/`` reloads through ``local-dir:`` on the oldest timm that requirements.txt admits, which does not
record ``model_args`` itself (timm < 1.0.31): the run writes them into config.json. setup.sh installs that timm
into ``.venv/oldest-timm`` (beside, not over, the project's own); the reload runs in a subprocess that imports it."""
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from helpers import ROOT, needs_data

OLDEST = re.search(r'^timm>=([0-9.]+)', open(os.path.join(ROOT, 'requirements.txt')).read(), re.M).group(1)
FOLDER = os.path.join(ROOT, '.venv', 'oldest-timm')

RELOAD = """
import json, sys, torch, timm, vit_gka
assert timm.__version__ == sys.argv[2], (timm.__version__, timm.__file__)
model = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    print(json.dumps({'timm': timm.__version__, 'logits': model(torch.randn(2, 1, 28, 28)).tolist(),
                      'classes': model.num_classes, 'attn': type(model.blocks[0].attn).__name__}))
"""


@needs_data
@pytest.mark.skipif(not os.path.isdir(os.path.join(FOLDER, 'timm')),
                    reason=f'needs timm {OLDEST} in .venv/oldest-timm (bash setup.sh installs it)')
def test_model_folder_reloads_on_the_oldest_timm(finished_run, tmp_path):
    run_dir = finished_run
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([FOLDER, ROOT])}
    proc = subprocess.run([sys.executable, '-c', RELOAD, str(run_dir / 'model'), OLDEST], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads(proc.stdout.strip().splitlines()[-1])
    assert old['timm'] == OLDEST != timm.__version__ and old['classes'] == 10
    assert old['attn'] == 'GaussianKernelAttention'
    # the same model as this process's timm builds from the folder: identical logits
    model = timm.create_model(f'local-dir:{run_dir}/model', pretrained=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expect = model(torch.randn(2, 1, 28, 28))
    assert torch.equal(torch.tensor(old['logits'], dtype=expect.dtype), expect)
