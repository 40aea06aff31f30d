"""ONNX export of a trained GKA model (vit_gka/export.py, timm's exporter): the fused path exports, and onnxruntime
gives PyTorch's logits on a batch of another size; mistakes end in one line."""

import pytest

from helpers import ROOT, needs_data, one_line_error, python

pytest.importorskip('onnxruntime', reason="needs pip install '.[onnx]'")


@needs_data
def test_trained_gka_exports_and_onnxruntime_matches(finished_run, tmp_path):
    import onnx
    from vit_gka.export import export_onnx, load_for_export
    run_dir = finished_run
    proc = python(['-m', 'vit_gka.export', str(run_dir), str(tmp_path / 'gka.onnx')], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'checked with onnxruntime, largest logit difference to PyTorch' in proc.stdout
    graph = onnx.load(str(tmp_path / 'gka.onnx')).graph
    ops = {node.op_type for node in graph.node}
    assert {'Softmax', 'MatMul'} <= ops  # GKA's attention in its fused form: q'.x, the bias, softmax, W.x
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis
    model = load_for_export(str(run_dir / 'model'))  # the model/ folder itself loads too
    assert type(model.blocks[0].attn).__name__ == 'GaussianKernelAttention'
    assert export_onnx(model, str(tmp_path / 'again.onnx'), batch_size=1) < 1e-4


def test_export_mistakes_give_one_line(tmp_path):
    for args, message in (([str(tmp_path), 'x.onnx'], 'holds no model/ folder'),
                          (['no_such_model', 'x.onnx'], "'no_such_model' is neither a folder nor a timm model name"),
                          (['gka_deit_tiny_patch16_224', 'x.onnx', '--batch-size', '0'], '--batch-size must be')):
        proc = python(['-m', 'vit_gka.export', *args], tmp_path, timeout=120)
        one_line_error(proc, message)
