"""The publish command (vit_gka/publish.py): a run's model/ plus a model card, a folder that loads with timm, tested
offline up to the upload (which, offline, ends in one line with the folder kept)."""
import json
import os

import timm
import torch
from huggingface_hub import ModelCard

from helpers import needs_data, one_line_error, python

import vit_gka  # noqa: F401


def _publish(*args, env=None):
    return python(['-m', 'vit_gka.publish', *map(str, args)], os.getcwd(), {**os.environ, **(env or {})})


@needs_data
def test_published_folder_loads_and_has_a_model_card(finished_run, tmp_path):
    run_dir, out = finished_run, tmp_path / 'hub'
    proc = _publish(run_dir, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {'config.json', 'model.safetensors', 'README.md', 'config.yaml'} <= set(os.listdir(out))
    card = (out / 'README.md').read_text()
    res = json.loads((run_dir / 'results.json').read_text())
    these = res['ema_top1'] if res['model_folder_weights'] == 'ema' else res['top1']
    assert card.startswith('---\n') and '\nlibrary_name: timm\n' in card and f"| **{these:.2f}** | {res['model_folder_weights']} |" in card
    assert 'Projection-Free Transformers via Gaussian Kernel Attention' in card and 'local-dir:' in card
    meta = ModelCard.load(out / 'README.md').data  # the Hub's reading of the header
    assert meta.license == 'mit' and meta.datasets == ['fashion_mnist']  # Fashion-MNIST's licence, not the code's
    [result] = meta.eval_results  # model-index
    assert result.metric_name == 'top-1' and result.metric_value == round(these, 2) and result.dataset_split == 'test'
    published = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    original = timm.create_model(f'local-dir:{run_dir}/model', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(published(x), original(x))

    again = _publish(run_dir, out)  # never writes into a folder that holds something
    one_line_error(again, 'exists and is not empty')
    offline = _publish(run_dir, tmp_path / 'hub2', '--repo-id', 'me/gka')  # offline: conftest.py
    one_line_error(offline, 'could not upload')
    assert 'hf-hub:me/gka' in (tmp_path / 'hub2' / 'README.md').read_text()  # the folder is ready all the same


def test_publish_needs_a_finished_run(tmp_path):
    one_line_error(_publish(tmp_path, tmp_path / 'out'), 'is not a finished training run')
