"""The model families in timm's registry (importing this registers them): ``gka_deit_*`` (GKA), ``vlt_deit_*``
(the paper's VLT ablation) and ``?ka_<normalization>_deit_*`` (compact kernels); ``_builder`` is what they share."""
from vit_gka.models import compact_deit, gka_deit, vlt_deit
from vit_gka.models._builder import KernelVisionTransformer

__all__ = ['KernelVisionTransformer', 'compact_deit', 'gka_deit', 'vlt_deit']
