import os

# torch.compile (the GPU recipe, compiled benchmarks) compiles in its own process: the pool of compile worker
# processes Inductor starts otherwise (fresh interpreters, each importing torch) costs the suite more CPU than its
# parallel builds save, as pytest-xdist's workers already use every core. Inductor reads this when it is imported.
os.environ.setdefault('TORCHINDUCTOR_COMPILE_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (impl='triton', tests/test_gka_triton.py) run in Triton's CPU interpreter. It must be
# chosen before triton is first imported, and importing timm imports it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
# No test reaches the network (CI has none): Hugging Face Hub offline, for this process and every run it starts. The
# Hub reads the variable when it is imported, so it is set before anything imports it, and the runs that
# forked.py forks inherit it.
os.environ['HF_HUB_OFFLINE'] = '1'

import vit_gka  # noqa: E402,F401  (registers the models)

# pytest-xdist's workers (pyproject: -n auto) share the cores: each computes on its share, not on all of them
if os.environ.get('PYTEST_XDIST_WORKER_COUNT'):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ['PYTEST_XDIST_WORKER_COUNT'])))

from helpers import FINISHED, HAS_FMNIST, ROOT, check, run  # noqa: E402


@pytest.fixture(scope='session')
def finished_run(tmp_path_factory):
    """One finished tiny GKA run (helpers.FINISHED) per test session, shared by every test that reads a run folder:
    eval, export, publish, the model/ faults, the disk faults. A test that changes the folder works on
    ``helpers.copy_run`` of it."""
    if not HAS_FMNIST:
        pytest.skip('needs the Debian package dataset-fashion-mnist')
    folder = tmp_path_factory.mktemp('finished') / 'run'
    check(run([*FINISHED, f'hydra.run.dir={folder}'], cwd=ROOT))
    return folder


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
