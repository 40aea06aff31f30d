"""A trained run, ready for the Hugging Face Hub (``python -m vit_gka.publish`` / ``vit-gka-publish``):

    python -m vit_gka.publish runs/gka_fmnist/<date> hub/gka_fmnist                # the folder only
    python -m vit_gka.publish runs/gka_fmnist/<date> hub/gka_fmnist --repo-id me/gka-fmnist   # and upload it

The folder holds the run's ``model/`` (timm's ``save_for_hf`` files: ``config.json`` with the ``create_model``
arguments and class names, ``model.safetensors``) and a model card ``README.md``: the numbers of results.json
(top-1, parameters, GMACs, training speed and time), the recipe of config.yaml, how to load it
(``timm.create_model('hf-hub:<repo id>', pretrained=True)`` after ``import vit_gka``, or ``local-dir:`` on the
folder) and the paper. ``--repo-id`` uploads the folder with ``huggingface_hub.upload_folder`` (needs a network
and ``huggingface-cli login``). Mistakes end in one line ``error: ...``, exit status 2.
"""
import argparse
import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence

from omegaconf import OmegaConf

from vit_gka.errors import UserError, fail
from vit_gka.train.checkpoint import EXIT_IO_ERROR, write_failed

__all__ = ['card_data', 'model_card', 'write_folder', 'upload', 'main', 'cli']

PROG = 'python -m vit_gka.publish'
PAPER = ('Kundu, Ghosh, Ghosh, Honavar. Projection-Free Transformers via Gaussian Kernel Attention. '
         'arXiv:2605.02144, 2026.')
RECIPE_KEYS = ('epochs', 'batch_size', 'grad_accum', 'lr', 'lr_scale', 'seed', 'train_subset')


def _number(value: Any, fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


def card_data(results: Dict[str, Any], config: Dict[str, Any], name: str, these: Optional[float]):
    """The card's metadata (``huggingface_hub.ModelCardData``): the data set's licence (the run's ``data.license``;
    weights trained on a data set carry its terms, not the code's), and ``model-index`` with the top-1 of these
    weights on the test split."""
    from huggingface_hub import EvalResult, ModelCardData
    data = str(results['data'])
    results_index = [EvalResult(task_type='image-classification', dataset_type=data, dataset_name=data,
                                dataset_split='test', metric_type='accuracy', metric_name='top-1',
                                metric_value=round(these, 2))] if these is not None else None
    return ModelCardData(library_name='timm', license=(config.get('data') or {}).get('license') or 'unknown',
                         tags=['image-classification', 'timm', 'vit-gka'], datasets=[data], model_name=name,
                         eval_results=results_index)


def model_card(results: Dict[str, Any], config: Dict[str, Any], name: str, repo_id: Optional[str]) -> str:
    """The model card (``huggingface_hub.ModelCard``: the Hub's YAML header, then Markdown) of a run: its
    results.json and config.yaml."""
    from huggingface_hub import ModelCard
    load = f"hf-hub:{repo_id}" if repo_id else 'local-dir:<this folder>'
    weights = results.get('model_folder_weights') or 'model'
    these = results.get('ema_top1') if weights == 'ema' else results.get('top1')
    recipe = {k: config.get(k) for k in RECIPE_KEYS}
    optim, sched, aug = config.get('optim') or {}, config.get('sched') or {}, config.get('aug') or {}
    lines = [
        f'# {name}', '',
        f"A `{results['model']}` (vit-gka: Gaussian Kernel Attention, no query / key / value projections) trained on "
        f"`{results['data']}` ({results['num_classes']} classes, {results.get('img_size')} px) for "
        f"{results.get('epochs_done')} epochs with the vit-gka training suite.", '',
        '## Results', '',
        '| top-1 of these weights | weights | raw top-1 | EMA top-1 | params (M) | GMACs | train img/s | wall (s) | '
        'precision |',
        '|---:|---|---:|---:|---:|---:|---:|---:|---|',
        f"| **{_number(these, '.2f')}** | {weights} | {_number(results.get('top1'), '.2f')} | "
        f"{_number(results.get('ema_top1'), '.2f')} | "
        f"{results['params'] / 1e6:.3f} | {_number(results.get('gmacs'), '.4f')} | "
        f"{_number(results.get('train_images_per_s'), '.0f')} | {_number(results.get('wall_time_s'), '.0f')} | "
        f"{results.get('mixed_precision', 'no')} |", '',
        'Top-1 on the test split as the training run measured it; the folder holds the better of the raw and the '
        'EMA weights (`eval.py` reproduces its number).', '',
        '## Training recipe', '',
        f"Run `{results.get('model_config')}`; " + ', '.join(f'{k} {v}' for k, v in recipe.items() if v is not None)
        + f"; optimizer {optim.get('opt')} (weight decay {optim.get('weight_decay')}), schedule {sched.get('sched')} "
        f"({sched.get('warmup_epochs')} warm-up epochs); augmentation: RandAugment {aug.get('auto_augment')}, mixup "
        f"{aug.get('mixup')}, cutmix {aug.get('cutmix')}, label smoothing {aug.get('smoothing')}. The whole "
        'configuration is `config.yaml` beside this card.', '',
        '## Use', '', '```python', 'import timm, vit_gka  # vit_gka registers the architecture with timm',
        f"model = timm.create_model('{load}', pretrained=True).eval()", '```', '',
        '## Paper', '', PAPER, '',
    ]
    header = card_data(results, config, name, these).to_yaml()
    return str(ModelCard(f'---\n{header}\n---\n\n' + '\n'.join(lines)))


def write_folder(run_dir: str, out: str, repo_id: Optional[str] = None) -> str:
    """``out`` with the run's model/ files, its config.yaml and the model card; returns the card's path. Every
    check comes first; the folder is filled beside ``out`` and renamed into place, so a failed write (a full disk)
    leaves no half-written ``out`` behind."""
    from vit_gka.train.checkpoint import atomic_dir
    from vit_gka.train.loading import model_folder_files
    model_dir = os.path.join(run_dir, 'model')
    for need in (os.path.join(run_dir, 'results.json'), os.path.join(model_dir, 'config.json')):
        if not os.path.isfile(need):
            raise UserError(f'{run_dir} is not a finished training run with a model/ folder (no {os.path.basename(need)})')
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f'{out} exists and is not empty; give a new folder')
    files = model_folder_files(model_dir)  # config.json and safetensors: a pickle there is refused
    try:
        with open(os.path.join(run_dir, 'results.json')) as f:
            results = json.load(f)
        config = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, 'config.yaml'))) \
            if os.path.isfile(os.path.join(run_dir, 'config.yaml')) else {}
        name = repo_id.split('/')[-1] if repo_id else os.path.basename(os.path.abspath(out))
        card_text = model_card(results, config, name, repo_id)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{run_dir}: results.json or config.yaml is corrupt ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); publish a finished run') from e
    if os.path.isdir(out):
        os.rmdir(out)  # empty: the finished folder is renamed into its place
    with atomic_dir(out) as tmp:
        for path in files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        if config:
            shutil.copyfile(os.path.join(run_dir, 'config.yaml'), os.path.join(tmp, 'config.yaml'))
        with open(os.path.join(tmp, 'README.md'), 'w') as f:
            f.write(card_text)
    return os.path.join(out, 'README.md')


def upload(folder: str, repo_id: str) -> str:
    """The folder to the Hub repo ``repo_id`` (created if missing); its URL. Network errors are one line."""
    from huggingface_hub import create_repo, upload_folder
    try:
        create_repo(repo_id, exist_ok=True)
        return str(upload_folder(repo_id=repo_id, folder_path=folder, commit_message='vit-gka: publish a run'))
    except Exception as e:  # requests / huggingface_hub errors: offline, not logged in, no rights
        raise UserError(f'could not upload {folder} to {repo_id}: {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""} (the folder is ready; upload it later with '
                        f'the same command)') from e


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run', help='a finished training run folder (results.json, model/)')
    p.add_argument('out', help='the folder to write (new or empty)')
    p.add_argument('--repo-id', default=None, help='also upload it to this Hugging Face Hub repo (user/name)')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> None:
    args = parser(prog).parse_args(argv)
    try:
        card = write_folder(args.run, args.out, args.repo_id)
        print(f'{args.out}: model/ files, config.yaml and the model card {os.path.basename(card)}')
        if args.repo_id:
            print(f'uploaded: {upload(args.out, args.repo_id)}')
    except UserError as e:
        fail(str(e))
    except OSError as e:  # a full or read-only disk: nothing half-written is left (write_folder)
        fail(str(write_failed(args.out, e, 'make room (or fix the disk), then run the same command again')),
             EXIT_IO_ERROR)


def cli() -> None:
    main(prog='vit-gka-publish')


if __name__ == '__main__':
    main()
