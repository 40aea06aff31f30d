"""The model families in timm's registry (importing this registers them): ``gka_deit_*`` (GKA), ``gka_q_deit_*`` /
``gka_k_deit_*`` (GKA with a bandwidth per query / key token), ``vlt_deit_*`` (the paper's VLT ablation) and
``?ka_<normalization>_deit_*`` (compact kernels); ``_builder`` is what they share. It also names the attention layers
for any timm ViT: ``timm.create_model('deit3_small_patch16_224', attn_layer='gka')`` (or ``'gka_q'``, ``'gka_k'``)."""
from timm.models import vision_transformer

from vit_gka.layers import GaussianKernelAttention, KernelAttention, ValueFreeAttention, VariableBandwidthAttention
from vit_gka.models import compact_deit, gka_deit, vlt_deit
from vit_gka.models._builder import KernelVisionTransformer, bind_attn_args

__all__ = ['ATTN_LAYER_NAMES', 'KernelVisionTransformer', 'compact_deit', 'gka_deit', 'vlt_deit']

# The names under which any timm VisionTransformer (vit_*, deit3_*, ...) takes these layers as ``attn_layer``:
# timm resolves a string attn_layer in vision_transformer.ATTN_LAYERS, so a model folder saved with
# attn_layer='gka' in its config.json reloads (local-dir:, hf-hub:) wherever vit_gka is imported.
ATTN_LAYER_NAMES = {'gka': GaussianKernelAttention, 'gka_triton': bind_attn_args(GaussianKernelAttention, impl='triton'),
                    'vlt': ValueFreeAttention, 'compact': KernelAttention,
                    'gka_q': bind_attn_args(VariableBandwidthAttention, bandwidth='query'),
                    'gka_k': bind_attn_args(VariableBandwidthAttention, bandwidth='key')}
for _name, _layer in ATTN_LAYER_NAMES.items():
    vision_transformer.ATTN_LAYERS.setdefault(_name, _layer)
