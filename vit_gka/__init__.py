"""vit-gka: Gaussian Kernel Attention ViTs for timm. Importing the package registers the models.

Layers, each importing only those before it:

* ``vit_gka.layers``: the attention layers (torch and entmax only), what a timm user imports;
* ``vit_gka.models``: their DeiT families in timm's registry;
* ``vit_gka.data``: data sets, transforms and the seeded training order (torchvision, timm);
* ``vit_gka.analysis``: FLOPs, attention statistics, benchmarks, reports and plots;
* ``vit_gka.train``: the training job (Hydra, Accelerate, TensorBoard); ``vit_gka.evaluate``: eval.py.
"""
from vit_gka.layers import (GaussianKernelAttention, KernelAttention, ValueFreeAttention, VariableBandwidthAttention,
                            gka_reference, gka_sdpa_bias, gka_sdpa_pad)
from vit_gka import models  # noqa: F401  (registers the gka_deit_*, gka_{q,k}_deit_*, vlt_deit_* and compact families)

__all__ = ['GaussianKernelAttention', 'KernelAttention', 'ValueFreeAttention', 'VariableBandwidthAttention',
           'gka_reference', 'gka_sdpa_bias', 'gka_sdpa_pad']
