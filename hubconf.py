"""torch.hub entry points: every model vit-gka registers in timm, under its timm name.

    model = torch.hub.load('<a checkout of vit-gka>', 'gka_deit_small_patch16_224', source='local')
    model = torch.hub.load('<checkout>', 'gka_deit_tiny_patch16_224', source='local', num_classes=10, img_size=64)

Each entry point is ``timm.create_model(<name>, pretrained=False, **kwargs)``.
"""
import os
import sys

# what torch.hub checks before loading: every package a model of vit_gka imports (the compact kernels: entmax;
# timm: torchvision; the shipped weights: safetensors)
dependencies = ['torch', 'torchvision', 'timm', 'entmax', 'safetensors']

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout's vit_gka, installed or not
import timm  # noqa: E402
import vit_gka  # noqa: E402,F401  (registers the models with timm)



def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs):
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f'timm.create_model({name!r}, pretrained=pretrained, **kwargs) (vit-gka)'
    return create


for _name in timm.list_models():  # the registry says which models are this package's
    if timm.models.model_entrypoint(_name).__module__.startswith('vit_gka.'):
        globals()[_name] = _entry_point(_name)
