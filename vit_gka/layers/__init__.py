"""Projection-free attention layers for timm ViTs (torch and entmax only): GKA, its compact-kernel relatives
and the paper's VLT ablation, with the masks they share.

* ``projection_free``: ``ProjectionFreeAttention``, the base of GKA and the compact kernels (heads, bandwidths,
  masks, W_O), and ``ProjectedHeads`` (heads and W_O, shared with VLT);
* ``gka``: the paper's Eq. 2-7 and ``GaussianKernelAttention``; ``gka_backends``: the same through fused kernels;
* ``bandwidths``: ``VariableBandwidthAttention``, GKA with a bandwidth per query or per key token (fused and exact);
* ``compact``: compact kernels and ``KernelAttention``; ``vlt``: ``ValueFreeAttention``; ``masks``: Eq. 7's masks.
"""
from vit_gka.layers.bandwidths import VariableBandwidthAttention
from vit_gka.layers.compact import KernelAttention
from vit_gka.layers.gka import GaussianKernelAttention, gka_reference
from vit_gka.layers.gka_backends import gka_sdpa_bias, gka_sdpa_pad
from vit_gka.layers.projection_free import ProjectedHeads, ProjectionFreeAttention
from vit_gka.layers.vlt import ValueFreeAttention

__all__ = ['GaussianKernelAttention', 'KernelAttention', 'ProjectedHeads', 'ProjectionFreeAttention',
           'ValueFreeAttention', 'VariableBandwidthAttention', 'gka_reference', 'gka_sdpa_bias', 'gka_sdpa_pad']
