"""The Triton GKA operator (``impl='triton'``) against the float64 materialised definition.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, which conftest.py sets before
triton is first imported). With ``-m gpu`` the same checks
run on CUDA, plus bfloat16 against the float32 reference and a CUDA-graph capture.
"""
import gzip
import os

import numpy as np
import pytest
import timm
import torch

from vit_gka import GaussianKernelAttention
from vit_gka.layers import gka_triton as gt
from vit_gka.layers.gka import gka_reference
from vit_gka.layers.masks import build_mask, resolve_grid

from helpers import HAS_FMNIST

pytest.importorskip('triton')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
F64 = torch.float64

# (batch, tokens, heads, head width, mask): odd lengths and padded tails, every mask kind, ViT-S's 197 x 64.
CASES = [
    (2, 17, 2, 16, {}),
    (1, 1, 1, 16, {}),
    (1, 17, 2, 20, {}),  # a head width that is not a power of two
    (1, 37, 3, 32, {'causal': True}),
    (2, 37, 1, 16, {'window': 5}),
    (1, 37, 2, 16, {'window': 4, 'causal': True}),
    (1, 50, 2, 16, {'window_2d': 1}),  # a 7 x 7 grid and a class token
    (1, 197, 1, 64, {}),
    (1, 197, 1, 32, {'window_2d': 2}),  # 14 x 14: query blocks skip the key blocks out of reach
]


def _reference(x, log_sigma, causal=False, window=None, window_2d=None):
    """The paper's materialised GKA (eps = 0) on heads x (B, N, H, d) -> (B, N, H, d)."""
    mask = build_mask(x.shape[1], x.device, None, causal, window, window_2d)
    return gka_reference(x.transpose(1, 2), log_sigma, mask, eps=0.0).transpose(1, 2)


def _triton(x, log_sigma, causal=False, window=None, window_2d=None):
    prefix, _, grid_w = resolve_grid(x.shape[1]) if window_2d is not None else (0, 1, 1)
    return gt.gka_triton(x, log_sigma, causal, window, window_2d, prefix, grid_w)


def _inputs(B, N, H, d, seed=0):
    """Tokens laid out as a model has them: the (B, N, H, d) view of a slice of a wider (B, N, 3 H d) tensor, so
    the kernel reads strided heads; a bandwidth per head around GKA's default; an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, N, 3 * H * d, dtype=F64, generator=g)
    log_sigma = torch.log(torch.full((H,), d ** 0.25, dtype=F64)) + 0.3 * torch.randn(H, dtype=F64, generator=g)
    grad = torch.randn(B, N, H, d, dtype=F64, generator=g)
    return wide, log_sigma, grad


def _values_and_grads(fn, wide, log_sigma, grad, H, d, dtype, masks):
    wide = wide.to(DEVICE, dtype).requires_grad_()
    log_sigma = log_sigma.to(DEVICE, torch.float32 if dtype != F64 else F64).requires_grad_()
    x = wide[..., H * d: 2 * H * d].unflatten(-1, (H, d))  # strided: not a contiguous tensor
    out = fn(x, log_sigma, **masks)
    (out.to(F64) * grad.to(DEVICE)).sum().backward()
    return out.to(F64).cpu(), wide.grad[..., H * d: 2 * H * d].to(F64).cpu(), log_sigma.grad.to(F64).cpu()


def _assert_close(got, expect, rel):
    scale = expect.abs().max().item()
    torch.testing.assert_close(got, expect, rtol=rel, atol=rel * max(scale, 1e-30))


def _assert_all_close(got, expect, rel):
    """(out, dx, d log_sigma) within ``rel``; d log_sigma sums N^2 terms that cancel, so its scale is that of the
    terms (sum |dx|), not of the sum."""
    for g, e, name in zip(got, expect, ('out', 'dx', 'dlog_sigma')):
        assert torch.isfinite(g).all(), name
        scale = 1.0 if name != 'dlog_sigma' else max(1.0, (expect[1].abs().sum() / e.abs().max()).item())
        _assert_close(g, e, rel * scale)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the operator allocates starts as NaN: an element a kernel fails to write shows."""
    monkeypatch.setattr(gt, '_empty', lambda shape, dtype, device: torch.full(shape, float('nan'), dtype=dtype,
                                                                               device=device))


@pytest.mark.parametrize('B, N, H, d, masks', CASES, ids=[f'{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}' for c in CASES])
def test_float32_matches_float64_reference(B, N, H, d, masks, poisoned):
    wide, log_sigma, grad = _inputs(B, N, H, d)
    got = _values_and_grads(_triton, wide, log_sigma, grad, H, d, torch.float32, masks)
    expect = _values_and_grads(_reference, wide, log_sigma, grad, H, d, F64, masks)
    _assert_all_close(got, expect, 1e-5)


def test_tiles_smaller_than_the_window(monkeypatch):
    """16-token tiles: many query and key blocks, window ranges that start and end inside a block."""
    monkeypatch.setattr(gt, 'INTERPRETER_TILES', {'BLOCK_M': 16, 'BLOCK_N': 16, 'BLOCK': 16})
    gt._kernels.cache_clear()
    try:
        for masks in ({'window_2d': 1}, {'window': 6, 'causal': True}):
            wide, log_sigma, grad = _inputs(1, 65, 1, 16, seed=3)
            got = _values_and_grads(_triton, wide, log_sigma, grad, 1, 16, torch.float32, masks)
            expect = _values_and_grads(_reference, wide, log_sigma, grad, 1, 16, F64, masks)
            for g, e in zip(got[:2], expect[:2]):
                _assert_close(g, e, 1e-5)
    finally:
        gt._kernels.cache_clear()


def _layers(impl, **kwargs):
    torch.manual_seed(0)
    layer = GaussianKernelAttention(48, 3, impl=impl, **kwargs)
    ref = GaussianKernelAttention(48, 3, impl='reference', eps=0.0, **kwargs).double()
    ref.load_state_dict(layer.state_dict())
    return layer.to(DEVICE), ref


@pytest.mark.parametrize('kwargs', [{}, {'window_2d': 1}])
def test_layer_with_output_projection(kwargs):
    """The layer's forward on the Triton path, W_O included: values and the gradients of x, log_sigma and W_O."""
    layer, ref = _layers('triton', **kwargs)
    x = torch.randn(2, 26, 48, dtype=F64, generator=torch.Generator().manual_seed(1))  # 5 x 5 grid + class token
    assert layer.backend(x.to(DEVICE, torch.float32), None, False) == 'triton'
    results = []
    for module, dtype in ((layer, torch.float32), (ref, F64)):
        xi = x.to(DEVICE, dtype).requires_grad_()
        out = module(xi)
        out.to(F64).square().sum().backward()
        results.append([out, xi.grad, module.log_sigma.grad, module.proj.weight.grad])
    for g, e in zip(*results):
        _assert_close(g.to(F64).cpu(), e.to(F64).cpu(), 1e-5)


def test_where_the_kernels_do_not_run(monkeypatch):
    """A caller's attn_mask, or a device the kernels cannot run on, takes the fused sdpa_pad path; no dropout."""
    layer, _ = _layers('triton')
    x = torch.randn(2, 10, 48)
    assert layer.backend(x, torch.ones(10, 10, dtype=torch.bool), False) == 'sdpa_pad'
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert layer.backend(x, None, False) == 'sdpa_pad'
    pad = GaussianKernelAttention(48, 3, impl='sdpa_pad')
    pad.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.cpu()(x), pad(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='impl="triton" has no attention dropout'):
        GaussianKernelAttention(48, 3, impl='triton', attn_drop=0.1)


def _fmnist_batch(n=8):
    """The first n Fashion-MNIST test images and labels, read from the Debian package's idx files."""
    root = '/usr/share/datasets/fashion-mnist'
    with gzip.open(os.path.join(root, 't10k-images-idx3-ubyte.gz')) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)[:n * 784].reshape(n, 1, 28, 28)
    with gzip.open(os.path.join(root, 't10k-labels-idx1-ubyte.gz')) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    x = (torch.from_numpy(images.copy()).float() / 255 - 0.2860) / 0.3530
    return x, torch.from_numpy(labels.astype(np.int64))


SMALL = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.skipif(not HAS_FMNIST, reason='needs the Debian package dataset-fashion-mnist')
def test_training_steps_match_sdpa_pad():
    """A tiny GKA model takes optimizer steps on real images with the same losses on the Triton path as on
    sdpa_pad (float32 rounding)."""
    x, y = _fmnist_batch()
    losses = {}
    for impl in ('triton', 'sdpa_pad'):
        torch.manual_seed(0)
        model = timm.create_model('gka_deit_tiny_patch16_224', impl=impl, **SMALL).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[impl] = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses['triton'] == pytest.approx(losses['sdpa_pad'], rel=1e-5)
    assert losses['triton'][-1] < losses['triton'][0]


def test_any_timm_vit_takes_it():
    """attn_layer='gka_triton' in any timm ViT: GKA with impl='triton', the same numbers as attn_layer='gka'."""
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', attn_layer='gka_triton', **kwargs).to(DEVICE).eval()
    plain = timm.create_model('vit_tiny_patch16_224', attn_layer='gka', **kwargs).to(DEVICE).eval()
    plain.load_state_dict(model.state_dict())
    assert all(b.attn.impl == 'triton' and isinstance(b.attn, GaussianKernelAttention) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_compile_has_no_graph_break():
    model = timm.create_model('gka_deit_tiny_patch16_224', impl='triton', window_2d=1, **SMALL).to(DEVICE)
    x = torch.randn(2, 1, 28, 28, device=DEVICE)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert 'vit_gka.gka_fwd' in explanation.graphs[0].code  # the operator, whole, inside the one graph


def test_fvcore_counts_the_operator():
    """fvcore sees vit_gka::gka_fwd when the model runs it, and counts it as the sdpa_bias form it equals."""
    from fvcore.nn import FlopCountAnalysis

    from vit_gka.measure.flops import _handles, model_stats
    model = timm.create_model('gka_deit_tiny_patch16_224', impl='triton', **SMALL).eval()
    analysis = FlopCountAnalysis(model, torch.randn(1, 1, 28, 28))
    for op, handle in _handles().items():
        analysis.set_op_handle(op, handle)
    analysis.unsupported_ops_warnings(False)
    macs = analysis.total() - analysis.by_operator().get('elementwise', 0)
    assert analysis.by_operator()['scaled_dot_product_attention'] > 0 and not analysis.unsupported_ops()
    assert macs / 1e9 == pytest.approx(model_stats(model)['gmacs'], rel=1e-9)  # counted as the sdpa_bias form


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('B, N, H, d, masks', [(4, 197, 6, 64, {}), (2, 197, 3, 64, {'window_2d': 2}),
                                               (2, 577, 2, 64, {'causal': True}), (2, 1025, 2, 128, {'window': 64})])
def test_half_precision_matches_float32_reference(dtype, B, N, H, d, masks):
    wide, log_sigma, grad = _inputs(B, N, H, d)
    got = _values_and_grads(_triton, wide, log_sigma, grad, H, d, dtype, masks)
    expect = _values_and_grads(_reference, wide.float(), log_sigma.float(), grad, H, d, torch.float32, masks)
    _assert_all_close(got, expect, 2e-2)


@pytest.mark.gpu
def test_cuda_graph_capture():
    x = torch.randn(2, 197, 6, 64, device='cuda', dtype=torch.bfloat16)
    log_sigma = torch.zeros(6, device='cuda')
    expect = _triton(x, log_sigma)  # also runs the autotuning outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _triton(x, log_sigma)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_gpu_benchmark_script_runs(tmp_path):
    """benchmarks/gka_triton.py (a step of benchmarks/gpu.sh) end to end on tiny shapes: every contender checked
    against float64 and timed, the JSON written. On the CPU this is the interpreter: a check, not a measurement."""
    import json

    from benchmarks import gka_triton as script
    out = tmp_path / 'kernel.json'
    script.main(['--device', DEVICE, '--dtype', 'float32', '--seqs', '26', '--batch-tokens', '26', '--heads', '2',
                 '--head-dim', '16', '--windows', '1', '--window-min-seq', '26', '--sizes', '--reps', '1',
                 '--warmup', '0', '--out', str(out)])
    rows = json.loads(out.read_text())['core']
    assert {(r['impl'], r['window_2d'], r['direction']) for r in rows} == {
        (impl, radius, direction) for direction in ('fwd', 'fwd+bwd') for impl, radius in
        [('triton', None), ('sdpa_pad', None), (script.CEILING, None), ('triton', 1), ('sdpa_pad', 1)]}
    assert all(r['ms'] > 0 for r in rows)


COMPILE_FOR_HOPPER = r'''
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vit_gka.layers import gka_triton_kernels as k

FLOAT32_BUFFERS = ('LSE', 'DELTA', 'DS_TOK', 'S_INV')

def compile_for_sm90(fn, dtype, constexprs):
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name.isupper() and name not in ('N', 'H'):
            signature[name] = '*fp32' if name in FLOAT32_BUFFERS else '*' + dtype
        else:
            signature[name] = 'i32'
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget('cuda', 90, 32), options={'num_warps': 4, 'num_stages': 2})
    assert compiled.asm['cubin'], fn

# bf16 with every mask branch (the training path), and the IEEE float32 dots once
flags = dict(HEAD_DIM=64, D_PAD=64, DOT_F32=False, CAUSAL=True, WINDOW=True, GRID=True)
compile_for_sm90(k.gka_fwd_kernel, 'bf16', dict(flags, BLOCK_M=64, BLOCK_N=64))
compile_for_sm90(k.gka_bwd_kernel, 'bf16', dict(flags, BLOCK=64))
compile_for_sm90(k.gka_fwd_kernel, 'fp32', dict(flags, DOT_F32=True, CAUSAL=False, WINDOW=False, GRID=False,
                                                BLOCK_M=64, BLOCK_N=64))
print('compiled')
'''


def test_kernels_compile_for_hopper(tmp_path):
    """Triton's GPU compiler (ptxas ships in its wheel) builds each kernel for sm_90 on this machine: what the
    interpreter accepts but a GPU would refuse (globals that are not constexpr, dot shapes, types that differ
    between branches) fails here, before any GPU is lent."""
    import subprocess
    import sys
    env = {**os.environ, 'TRITON_INTERPRET': '0', 'TRITON_CACHE_DIR': str(tmp_path)}  # compiled afresh
    proc = subprocess.run([sys.executable, '-c', COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and 'compiled' in proc.stdout, proc.stderr[-3000:]
