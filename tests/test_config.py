"""The Hydra configuration (conf), composed in-process: model x shape, the
defaults, the recipes, the experiments, and every key the training code reads. Fast: no training."""
import ast
import glob
import itertools
import os

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vit_gka.errors import UserError  # (importing vit_gka registers its models with timm)
from vit_gka.train.validation import check_model, validate
from vit_gka.cli import CONF_DIR, compose_option, options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAMILIES = [f for f in options('model') if f != 'timm']
COMPACT = [f for f in FAMILIES if f[:3] in ('eka', 'bka', 'tka')]
SHAPES = options('shape')

FMNIST = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)  # shape=fmnist


@pytest.fixture(scope='module')
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base='1.3'):
        yield


def composed(*overrides, config='config'):
    """The composed training config with its ``hydra`` node (Hydra's choices), ``${hydra:...}`` resolvable."""
    cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def model_of(cfg):
    return cfg.model.name, OmegaConf.to_container(cfg.model.args, resolve=True), cfg.model.drop_path


@pytest.mark.parametrize('family, shape', list(itertools.product(FAMILIES, SHAPES)))
def test_every_model_and_shape_builds_or_is_one_clear_error(hydra_conf, family, shape):
    cfg = composed(f'model={family}', f'shape={shape}')
    missing = (shape == 'native' or family in COMPACT and shape.startswith('base')
               or family == 'vlt' and shape == 'base_384')
    if missing:
        with pytest.raises(UserError) as e:
            validate(cfg)
        message = str(e.value)
        assert '\n' not in message and f'model={family}' in message and 'comes in shape=' in message
        assert (f'has no shape={shape}' if shape != 'native' else 'shape=native is for model=timm') in message
        return
    validate(cfg)
    name, args, drop_path = model_of(cfg)
    assert cfg.model_choice == f'{family}_{shape}'
    assert drop_path == (0.2 if shape.startswith('base') else 0.1)
    with torch.device('meta'):
        model = timm.create_model(name, **args, num_classes=10, drop_path_rate=drop_path)
    assert model.num_classes == 10
    assert model.patch_embed.img_size[0] == {'fmnist': 28, 'tiny_fmnist': 28, 'base_384': 384}.get(shape, 224)


def test_timm_family(hydra_conf):
    cfg = composed('model=timm', 'model.name=vit_small_patch16_224')
    assert HydraConfig.get().runtime.choices.shape == 'native' and model_of(cfg) == ('vit_small_patch16_224', {}, 0.1)
    assert check_model(cfg) == 'vit_small_patch16_224' and cfg.model_choice == 'vit_small_patch16_224_native'
    cfg = composed('model=timm', 'model.name=vit_small_patch16_224', 'shape=fmnist')
    assert model_of(cfg) == ('vit_small_patch16_224', FMNIST, 0.1) and cfg.model_choice == 'vit_small_patch16_224_fmnist'
    with pytest.raises(UserError, match='model=timm needs the timm model name'):
        validate(composed('model=timm'))
    with pytest.raises(UserError, match="unknown timm model 'no_such_model'"):
        validate(composed('model.name=no_such_model'))


def test_defaults_are_the_quickstart(hydra_conf):
    """``python train.py`` with no override: GKA at the Fashion-MNIST shape, recipe=quick."""
    cfg = composed()
    choices = HydraConfig.get().runtime.choices
    assert (choices.model, choices.shape, choices.data, choices.recipe, choices.experiment) == \
        ('gka', 'fmnist', 'fashion_mnist', 'quick', None)
    assert model_of(cfg) == ('gka_deit_tiny_patch16_224', FMNIST, 0.1) and cfg.model_choice == 'gka_fmnist'
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.drop_path, cfg.ema.decay, cfg.log_interval) == (6, 128, 8e-3, 0.0, 0.999, 20)
    assert OmegaConf.to_container(cfg.hydra.sweep)['subdir'] == '${hydra.job.num}_${model_choice}'
    assert set(cfg.hydra.callbacks) == {'sweep_summary', 'report'}  # every -m sweep ends with table and report
    validate(cfg)


def _flat(node, prefix=''):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def test_quick_recipe_lists_only_what_differs_from_deit():
    deit = _flat(OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, 'recipe', 'deit.yaml'))))
    quick = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, 'recipe', 'quick.yaml')))
    assert quick.pop('defaults') == ['deit', '_self_']
    for key, value in _flat(quick).items():
        assert key in deit and deit[key] != value, key


def test_data_sets_share_one_set_of_keys():
    """conf/_data.yaml holds every data key and its default; each data set states only what differs, and
    composed has every key."""
    base = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, '_data.yaml')))
    for name in options('data'):
        own = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, 'data', f'{name}.yaml')))
        assert own.pop('defaults') == ['/_data', '_self_'], name
        for key, value in own.items():
            assert key in base and base[key] != value, (name, key)
        assert list(compose_option('data', name)) == list(base), name


@pytest.mark.parametrize('name', options('experiment'))
def test_experiments(hydra_conf, name):
    """experiment=paper_<family>_<size>: that family and DeiT shape, the paper's recipe, ImageNet."""
    cfg = composed(f'experiment={name}')
    choices = HydraConfig.get().runtime.choices
    family, size = name.split('_')[1:]
    shape = {'ti': 'tiny', 's': 'small', 'b': 'base', 'b384': 'base_384'}[size]
    assert (choices.model, choices.shape, choices.recipe, choices.data) == (family, shape, 'deit', 'imagenet')
    assert cfg.epochs == 300 and cfg.drop_path == cfg.model.drop_path and cfg.model_choice == f'{family}_{shape}'
    validate(cfg)


# ------------------------------------------------------------------------- keys the training code reads
# Variables of vit_gka/train and vit_gka/data that hold a node of the training config -> the node.
ALIASES = {'cfg': '', 'self.cfg': '', 'data_cfg': 'data', 'aug': 'aug', 'aug_cfg': 'aug', 'opt_cfg': 'optim',
           'sched_cfg': 'sched', 'ema_cfg': 'ema'}
METHODS = {'get', 'update', 'items', 'keys', 'values', 'pop', 'copy', 'setdefault'}


def _chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return '.'.join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def _config_path(chain, key=None):
    for alias in sorted(ALIASES, key=len, reverse=True):
        if chain == alias or chain.startswith(alias + '.'):
            parts = [p for p in [ALIASES[alias]] + chain[len(alias):].split('.') if p] + ([key] if key else [])
            return '.'.join(parts[:-1] if parts and parts[-1] in METHODS else parts) or None
    return None


def keys_read_by_the_code():
    """{config key: files} of ``cfg.key``, ``cfg.get('key')``, ``_get(cfg, 'key')`` in vit_gka/train and
    vit_gka/data (cli.py and validation.py excepted: they read the hydra node and optional keys)."""
    found = {}
    files = glob.glob(os.path.join(ROOT, 'vit_gka', 'train', '*.py')) + glob.glob(os.path.join(ROOT, 'vit_gka', 'data', '*.py'))
    for path in sorted(files):
        if os.path.basename(path) in ('cli.py', 'validation.py'):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            key = None
            if isinstance(node, ast.Attribute) and _chain(node):
                key = _config_path(_chain(node))
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[-1], ast.AST):
                func, args = node.func, node.args
                if isinstance(func, ast.Attribute) and func.attr == 'get' and isinstance(args[0], ast.Constant) \
                        and _chain(func.value):
                    key = _config_path(_chain(func.value), str(args[0].value))
                elif isinstance(func, ast.Name) and func.id == '_get' and len(args) >= 2 \
                        and isinstance(args[1], ast.Constant) and _chain(args[0]):
                    key = _config_path(_chain(args[0]), str(args[1].value))
            if key:
                found.setdefault(key, set()).add(os.path.relpath(path, ROOT))
    return found


# What the code read when the defaults moved into the config (the scan above finds new ones).
REQUIRED = """seed train_subset resume stop_epoch checkpoint_every_steps nonfinite step_log workers eval_batch_size cpu
mixed_precision compile log_interval progress save_model model_choice epochs batch_size grad_accum lr lr_scale
lr_base_size repeated_aug drop_path clip_grad eval_interval model.name model.args model.drop_path
optim.opt optim.weight_decay optim.betas optim.eps optim.momentum
sched.sched sched.warmup_epochs sched.warmup_lr sched.min_lr sched.cooldown_epochs
aug.no_aug aug.scale aug.ratio aug.interpolation aug.hflip aug.vflip aug.color_jitter aug.auto_augment aug.re_prob
aug.re_mode aug.re_count aug.mixup aug.cutmix aug.cutmix_minmax aug.mixup_prob aug.mixup_switch_prob aug.mixup_mode
aug.smoothing ema.enable ema.decay ema.warmup
data.name data.root data.train_dir data.val_dir data.system_dir data.cache_dir data.download data.num_classes
data.in_chans data.mean data.std data.crop_pct data.interpolation data.eval_subset""".split()


def _has(cfg, key):
    node = cfg
    for part in key.split('.'):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node._get_node(part)
    return True


@pytest.mark.parametrize('data, recipe', list(itertools.product(options('data'), options('recipe'))))
def test_every_key_the_code_reads_is_in_the_config(hydra_conf, data, recipe):
    """One default per key, in the config: ``cfg.key`` works for every key the training code reads, with any
    data set and recipe (the code has no defaults of its own)."""
    cfg = composed(f'data={data}', f'recipe={recipe}')
    read = keys_read_by_the_code()
    missing = sorted(k for k in set(REQUIRED) | set(read) if not _has(cfg, k))
    assert not missing, 'read by the code but not in conf: ' + ', '.join(
        f"{k} ({', '.join(sorted(read.get(k, ['REQUIRED'])))})" for k in missing)
