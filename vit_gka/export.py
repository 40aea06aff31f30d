"""ONNX export of a trained model (``python -m vit_gka.export`` / ``vit-gka-export``), through timm's exporter:

    python -m vit_gka.export runs/gka_fmnist/<date> gka.onnx          # a run folder's model/
    python -m vit_gka.export gka_deit_small_patch16_224 gka_s.onnx    # a registered model (random weights)

The model is the one a user of the registry builds (``timm.create_model('local-dir:<run>/model',
pretrained=True)``), read from config.json and model.safetensors alone (a pickle in the folder is refused), exported with ``timm.utils.onnx.onnx_export`` (the ONNX checker, a dynamic batch axis) and
then run once with onnxruntime on a batch of another size, whose logits must match PyTorch's (``--atol``).

GKA exports on its fused path: the softmax identity through ``scaled_dot_product_attention`` with the key-norm
bias as an additive mask (``impl='auto'`` on the CPU), which ONNX has as MatMul / Add / Softmax. The TorchScript
exporter is used: torch's newer export-based exporter (``dynamo=True``, torch 2.14) exports timm's DeiT but fails
on GKA inside its own type-promotion pass (it re-runs the ``view`` that merges the heads on SDPA's decomposed
output, whose strides differ from eager SDPA's). Needs ``onnx`` and ``onnxruntime`` (``pip install '.[onnx]'``). Mistakes
end in one line ``error: ...``, exit status 2.
"""
import argparse
import os
from typing import Optional, Sequence

import torch

from vit_gka.errors import UserError, fail

__all__ = ['load_for_export', 'export_onnx', 'main', 'cli']

PROG = 'python -m vit_gka.export'


def load_for_export(source: str) -> torch.nn.Module:
    """A run folder's ``model/``, a ``model/`` folder itself, or a registered timm name (random weights)."""
    import timm
    import vit_gka  # noqa: F401  (registers the models)
    from vit_gka.train.loading import find_folder, load_model_folder
    folder = find_folder(source, ['config.json'], model=True)
    if folder is not None:
        return load_model_folder(folder)
    if os.path.exists(source):
        raise UserError(f'{source} holds no model/ folder (config.json); give a training run folder or its model/')
    if not timm.is_model(source):
        raise UserError(f"'{source}' is neither a folder nor a timm model name")
    return timm.create_model(source)


def export_onnx(model: torch.nn.Module, path: str, batch_size: int = 2, atol: float = 1e-4) -> float:
    """``model`` as ONNX in ``path`` (dynamic batch), checked with onnxruntime on a batch of ``batch_size + 1``
    against PyTorch: returns the largest absolute logit difference (``UserError`` when above ``atol``)."""
    try:
        import onnxruntime  # noqa: F401  (both needed by _export_checked: a missing one is one line here)
        from timm.utils.onnx import onnx_export  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs onnx and onnxruntime: pip install '.[onnx]' ({e})") from e
    model = model.eval()
    input_size = tuple(model.pretrained_cfg['input_size'])
    embed = getattr(model, 'patch_embed', None)
    if embed is not None:  # the size the model was built for (a run's img_size / in_chans)
        input_size = (embed.proj.in_channels, *embed.img_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, *input_size, generator=generator)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: {folder} is not a folder; give an existing folder')
    # written beside it and renamed once checked: a full disk or a failed check leaves no partial .onnx
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        return _export_checked(model, path, tmp, example, input_size, generator, atol)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _export_checked(model, path, tmp, example, input_size, generator, atol) -> float:
    """Export into ``tmp``, compare onnxruntime with PyTorch, rename ``tmp`` to ``path``; the largest difference."""
    import onnxruntime
    from timm.utils.onnx import onnx_export

    from vit_gka.train.checkpoint import write_failed
    from vit_gka.train.faults import test_fail_write
    try:
        onnx_export(model, tmp, example_input=example, check=True, use_dynamo=False,
                    input_names=['input0'], output_names=['output0'])
        test_fail_write(path)
    except OSError as e:
        raise write_failed(path, e, 'make room (or fix the disk), then run the same command again') from e
    other = torch.randn(example.shape[0] + 1, *input_size, generator=generator)
    session = onnxruntime.InferenceSession(tmp, providers=['CPUExecutionProvider'])
    got = torch.from_numpy(session.run(None, {'input0': other.numpy()})[0])
    with torch.no_grad():
        expect = model(other)
    diff = (got - expect).abs().max().item()
    if not diff <= atol:
        raise UserError(f'{path}: onnxruntime logits differ from PyTorch by {diff:.3g} (> --atol {atol})')
    os.replace(tmp, path)
    return diff


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='a training run folder, its model/ folder, or a registered timm model name')
    p.add_argument('out', help='the .onnx file to write')
    p.add_argument('--batch-size', type=int, default=2, help='example batch of the export (default: %(default)s)')
    p.add_argument('--atol', type=float, default=1e-4,
                   help='largest logit difference onnxruntime vs PyTorch allowed (default: %(default)s)')
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> None:
    args = parser(prog).parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError('--batch-size must be at least 1')
        diff = export_onnx(load_for_export(args.source), args.out, args.batch_size, args.atol)
    except UserError as e:
        fail(str(e), getattr(e, 'exit_code', 2))
    print(f'{args.out}: checked with onnxruntime, largest logit difference to PyTorch {diff:.2g}')


def cli() -> None:
    main(prog='vit-gka-export')


if __name__ == '__main__':
    main()
