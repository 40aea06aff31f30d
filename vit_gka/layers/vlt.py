"""The paper's "VLT" ablation (Table 5): dot-product attention without the value projection.

Paper: Kundu et al., "Projection-Free Transformers via Gaussian Kernel Attention", arXiv 2605.02144 (2026).
It isolates what removing W_V alone costs, next to GKA, which removes W_Q and W_K as well.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_gka.layers.masks import build_mask
from vit_gka.layers.projection_free import ProjectedHeads


class ValueFreeAttention(ProjectedHeads):
    """The paper's "VLT" ablation (Table 5): dot-product attention that keeps W_Q and W_K (and W_O) but
    has no value projection; values are the raw head features plus the value bias when ``qkv_bias``.

    Keeping that bias (a D-vector, as timm's qkv Linear has) is what reproduces the paper's 5.28 M
    parameters for VLT-Ti; without it the count is 5.27 M.
    """

    def __init__(self, dim: int, num_heads: int = 8, **timm_args) -> None:
        super().__init__(dim, num_heads, **timm_args)
        if self.qk_norm and self.norm_layer is None:
            raise ValueError('qk_norm=True needs a norm_layer')
        self.qk = nn.Linear(dim, 2 * dim, bias=self.qkv_bias, **self.dd)
        self.v_bias = nn.Parameter(torch.zeros(dim, **self.dd)) if self.qkv_bias else None
        self.q_norm = self.norm_layer(self.head_dim, **self.dd) if self.qk_norm else nn.Identity()
        self.k_norm = self.norm_layer(self.head_dim, **self.dd) if self.qk_norm else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        q, k = self.qk(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.split_heads(x if self.v_bias is None else x + self.v_bias)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = build_mask(N, x.device, attn_mask, is_causal)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p)
        return self.merge_heads(out)
