import os

import pytest
import torch

# Without a GPU, Triton kernels (impl='triton', tests/test_gka_triton.py) run in Triton's CPU interpreter. It must be
# chosen before triton is first imported, and importing timm imports it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import vit_gka  # noqa: E402,F401  (registers the models)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
