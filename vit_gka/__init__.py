"""vit-gka: Gaussian Kernel Attention ViTs for timm. Importing the package registers the models.

Layers, each importing only those before it:

* ``vit_gka.layers``: the attention layers (torch and entmax only), what a timm user imports;
* ``vit_gka.models``: their DeiT families in timm's registry;
* ``vit_gka.data``: data sets, transforms and the seeded training order (torchvision, timm);
* ``vit_gka.measure``: parameters and FLOPs, attention statistics, the timing harness;
* ``vit_gka.train``: the training job (Hydra, Accelerate, TensorBoard); ``vit_gka.evaluate``: eval.py;
* ``vit_gka.analysis`` (the folder ``analysis/``): the report over run folders, tables and plots;
* ``vit_gka.conf`` (the folder ``conf/``): the Hydra configs.

The package itself imports neither torch nor timm: the command-line entry points (``train.py``, ``eval.py``) live
in it, and their ``--help`` and shell completion answer without the seconds torch and timm take to import. The
models are registered as soon as timm is there: now, if timm is already imported, else right after timm's own
import finishes (``import vit_gka, timm`` and ``import timm, vit_gka`` both register them). The attention layers
are imported on first use (``vit_gka.GaussianKernelAttention``).
"""
import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ['GaussianKernelAttention', 'KernelAttention', 'ValueFreeAttention', 'VariableBandwidthAttention',
           'gka_reference', 'gka_sdpa_bias', 'gka_sdpa_pad']


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module('vit_gka.layers'), name)
    raise AttributeError(f"module 'vit_gka' has no attribute '{name}'")


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm as the other finders do, and registers vit_gka's models once timm's module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != 'timm':
            return None
        sys.meta_path.remove(self)  # once: the finders after this one locate timm
        spec = importlib.util.find_spec('timm')
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_and_register(module):
            exec_timm(module)
            importlib.import_module('vit_gka.models')

        spec.loader.exec_module = exec_and_register
        return spec


if 'timm' in sys.modules:
    importlib.import_module('vit_gka.models')
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
