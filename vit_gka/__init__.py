"""vit-gka: Gaussian Kernel Attention ViTs for timm. Importing the package registers the models."""
from .attention import GaussianKernelAttention, gka_reference, gka_sdpa_bias, gka_sdpa_pad
from .vlt import ValueFreeAttention
from . import models  # noqa: F401  (registers gka_deit_* / vlt_deit_* with timm)
from .kernels import KernelAttention
from . import kernel_models  # noqa: F401

__all__ = ['GaussianKernelAttention', 'KernelAttention', 'ValueFreeAttention', 'gka_reference', 'gka_sdpa_bias', 'gka_sdpa_pad']
