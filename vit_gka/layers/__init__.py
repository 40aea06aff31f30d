"""Projection-free attention layers for timm ViTs (torch and entmax only): GKA, its compact-kernel relatives
and the paper's VLT ablation, with the masks they share."""
from vit_gka.layers.gka import GaussianKernelAttention, gka_reference, gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.compact import KernelAttention
from vit_gka.layers.vlt import ValueFreeAttention

__all__ = ['GaussianKernelAttention', 'KernelAttention', 'ValueFreeAttention', 'gka_reference', 'gka_sdpa_bias',
           'gka_sdpa_pad']
