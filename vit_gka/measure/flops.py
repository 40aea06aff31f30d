"""Parameter and FLOP accounting with fvcore, including attention and GKA's own ops.

Units, named everywhere: fvcore counts one multiply-accumulate (MAC) as one; ``gmacs`` is that count
in 1e9 and ``gflops = 2 * gmacs`` is the unit of the GKA paper's Table 2 (timm publishes GMACs).

What is counted (one image, the model's own input size):

* Linear / conv / matmul / bmm: fvcore's handles. LayerNorm: fvcore's 5 per element (as timm's
  published 1.26 / 4.61 / 17.58 GMACs for DeiT-Ti / S / B).
* ``aten::scaled_dot_product_attention``, which fvcore skips: ``B*H*Nq*Nk*(d_qk + d_v)`` MACs, the
  scores q.k and the weighted sum of the values.
* GKA is counted as its mathematical operator: per head N x N scores over the head width d plus the
  weighted sum over d, ``2*N*N*d`` MACs, whichever backend runs. The ``sdpa_pad`` backend pads q, k and
  v from d to 8*ceil((d+1)/8) (64 -> 72: one bias column, seven zero columns); that is kernel
  padding, 12.5% more attention products on the hardware, not work of the model, so the counter runs
  the model with the unpadded ``sdpa_bias`` form (same result, same math). The paper's GKA-Ti / S / B
  figures (1.98 / 7.11 / 26.76 GFLOPs) match this count.
* Compact-kernel models (models/compact_deit.py) materialise the kernel: their two matmuls (x x^T and W x)
  count the same 2*N*N*d.
* Data-dependent bandwidths (``gka_q_deit_*`` / ``gka_k_deit_*``, ``VariableBandwidthAttention``) add, per head, the
  bandwidth projection a_h . x_i (a matmul, N*d MACs) and the widened head: scores over the d + 2 columns of q', k'
  (the whole exponent -||x_i - x_j||^2 / (2 sigma^2), layers/bandwidths.py) plus the weighted sum over d,
  ``N*N*(2*d + 2)`` MACs. They are counted in their unpadded fused form (``impl="sdpa"``) whatever ``impl`` runs
  (padding to a multiple of 8 is the kernel's).
* Element-wise ops (residual adds, GELU, softmax, GKA's key norms ||x_j||^2 and q = x / sigma^2, the
  additive key bias inside SDPA, the compact kernels' (1 - u^2)_+^n, entmax's sort (log2 N per score)
  or bisection (30 steps per score)) are tallied separately as ``gelementwise`` (1e9 element
  operations) and are *not* in ``gmacs``, as in fvcore's and timm's convention. Measured at 224: under
  1% of the MACs for GKA, VLT and DeiT, under 2.3% for the compact kernels, 5.3% for entmax
  bisection at Tiny size (tka_adaptive_deit_tiny): element-wise work, not multiply-accumulates.

Anything fvcore sees that no handle covers is listed in ``unsupported``; for every registered model
that list is empty.
"""
import contextlib
import math
import warnings
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit.script
    warnings.simplefilter('ignore', FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from vit_gka.layers import GaussianKernelAttention, VariableBandwidthAttention
from vit_gka.layers.compact import BISECT_ITERS_DEFAULT

__all__ = ['model_stats', 'param_breakdown', 'flop_count', 'input_shape', 'count_impl']

ATTN_NAMES = ('attn', 'attention', 'self_attn', 'token_mixer')
MLP_NAMES = ('mlp', 'ffn', 'feed_forward', 'channel_mixer')

# Element-wise (or reduction) ops: counted as one operation per element of their largest operand.
ELEMENTWISE_OPS = (
    'aten::add', 'aten::add_', 'aten::sub', 'aten::sub_', 'aten::rsub', 'aten::mul', 'aten::mul_',
    'aten::div', 'aten::div_', 'aten::neg', 'aten::exp', 'aten::exp_', 'aten::log', 'aten::pow',
    'aten::sqrt', 'aten::rsqrt', 'aten::sum', 'aten::mean', 'aten::amax', 'aten::amin',
    'aten::clamp_min', 'aten::clamp_max', 'aten::gelu', 'aten::gelu_', 'aten::silu', 'aten::silu_',
    'aten::sigmoid', 'aten::tanh', 'aten::softmax', 'aten::log_softmax', 'aten::abs', 'aten::where',
    'aten::lerp', 'aten::addcmul', 'aten::erf', 'aten::square', 'aten::max_pool2d', 'aten::avg_pool2d',
    'aten::adaptive_max_pool2d', 'aten::hardswish', 'aten::hardsigmoid', 'aten::leaky_relu', 'aten::hardtanh',
    'aten::linalg_vector_norm',
)
# Boolean / integer / copy ops that build masks or move data: no arithmetic on activations.
ZERO_WORK_OPS = (
    'aten::le', 'aten::lt', 'aten::ne', 'aten::logical_and', 'aten::logical_or', 'aten::logical_not',
    'aten::any', 'aten::all', 'aten::ones_like', 'aten::empty_like', 'aten::repeat', 'aten::expand_as',
    'aten::masked_fill_', 'aten::clone', 'aten::scalar_tensor', 'aten::fill_', 'aten::numpy_T',
    'aten::linspace', 'aten::meshgrid', 'aten::flip', 'aten::__or__', 'aten::__xor__', 'aten::__not__',
    'aten::eye', 'aten::triu', 'aten::tril',
)


def _numel(value) -> int:
    shape = get_shape(value)
    return math.prod(shape) if shape is not None else 0


def _elementwise_handle(inputs: List, outputs: List) -> Counter:
    return Counter({'elementwise': max([_numel(v) for v in list(inputs) + list(outputs)] + [0])})


def _entmax_handle(ops_per_score) -> object:
    """entmax / sparsemax (PyPI ``entmax`` autograd Functions, compact-kernel models): element-wise
    work on the N x N scores, ``ops_per_score(N)`` operations per score (sort or bisection steps)."""
    def handle(inputs: List, outputs: List) -> Counter:
        shape = get_shape(inputs[0])
        return Counter({'elementwise': math.prod(shape) * ops_per_score(shape[-1])})
    return handle


def _sdpa_handle(inputs: List, outputs: List) -> Counter:
    """aten::scaled_dot_product_attention(q, k, v, attn_mask, ...): B*H*Nq*Nk*(d_qk + d_v) MACs."""
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    scores = batch * q[-2] * k[-2]
    macs = scores * (q[-1] + v[-1])
    elementwise = scores * (2 if get_shape(inputs[3]) is not None else 1)  # softmax exp (+ mask add)
    return Counter({'scaled_dot_product_attention': macs, 'elementwise': elementwise})


def _gka_op_handle(inputs: List, outputs: List) -> Counter:
    """vit_gka::gka_fwd(x (B, N, H, d), ...), the Triton GKA: as SDPA with q = s x, k = v = x, B*H*N*N*2d MACs, and
    the key norms and query scaling as 2*B*N*H*d element-wise operations."""
    B, N, H, d = get_shape(inputs[0])
    return Counter({'scaled_dot_product_attention': B * H * N * N * 2 * d, 'elementwise': 2 * B * N * H * d})


def _handles() -> Dict[str, object]:
    handles = {op: _elementwise_handle for op in ELEMENTWISE_OPS}
    handles.update({op: None for op in ZERO_WORK_OPS})
    handles['aten::scaled_dot_product_attention'] = _sdpa_handle
    handles['vit_gka::gka_fwd'] = _gka_op_handle
    sort_steps = _entmax_handle(lambda n: max(1, math.ceil(math.log2(n))))  # sort-based threshold
    handles['prim::PythonOp.SparsemaxFunction'] = sort_steps
    handles['prim::PythonOp.Entmax15Function'] = sort_steps
    handles['prim::PythonOp.EntmaxBisectFunction'] = _entmax_handle(lambda n: BISECT_ITERS_DEFAULT)
    return handles


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, '_orig_mod', None) or (
            model.module if isinstance(getattr(model, 'module', None), nn.Module) else None)
        if inner is None:
            return model
        model = inner


@contextlib.contextmanager
def count_impl(model: nn.Module) -> Iterator[nn.Module]:
    """Run GKA layers in their unpadded fused form (``sdpa_bias``, also for ``triton``: one count whatever the device)
    for counting, and ``VariableBandwidthAttention`` in its unpadded widened form (``sdpa``, whatever
    its impl); restored on exit.

    GKA's materialised ``reference`` form is left as it is (its two matmuls count the same 2*N*N*d).
    """
    saved = []
    for module in model.modules():
        if isinstance(module, VariableBandwidthAttention):
            saved.append((module, module.impl))
            module.impl = 'sdpa'
        elif isinstance(module, GaussianKernelAttention) and module.impl != 'reference':
            saved.append((module, module.impl))
            module.impl = 'sdpa_bias'
    try:
        yield model
    finally:
        for module, impl in saved:
            module.impl = impl


def input_shape(
        model: nn.Module,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        in_chans: Optional[int] = None,
) -> Tuple[int, int, int]:
    """(C, H, W) of one input image: the arguments, else the model's patch embedding / first conv /
    pretrained config."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cfg_size = tuple(cfg.get('input_size', (3, 224, 224)))
    if in_chans is None:
        first = cfg.get('first_conv')
        try:
            weight = model.get_submodule(first).weight if first else None
        except AttributeError:
            weight = None
        in_chans = weight.shape[1] if weight is not None and weight.dim() == 4 else cfg_size[0]
    if img_size is None:
        embed = getattr(model, 'patch_embed', None)
        img_size = getattr(embed, 'img_size', None) or cfg_size[1:]
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    return int(in_chans), int(img_size[0]), int(img_size[1])


def _part(name: str) -> str:
    parts = name.split('.')
    if any(p in ATTN_NAMES for p in parts):
        return 'attn'
    if any(p in MLP_NAMES for p in parts):
        return 'mlp'
    return 'other'


def param_breakdown(model: nn.Module) -> Dict[str, int]:
    """Parameters in total, in attention modules (``*.attn.*``: W_Q/K/V, W_O, GKA's log_sigma, the data-dependent
    bandwidths' log_sigma_proj), in MLPs (``*.mlp.*``) and elsewhere (patch embedding, position embedding, class
    token, norms, head)."""
    counts = Counter({'attn': 0, 'mlp': 0, 'other': 0})
    for name, p in unwrap(model).named_parameters():
        counts[_part(name)] += p.numel()
    return {'params': sum(counts.values()), 'params_attn': counts['attn'],
            'params_mlp': counts['mlp'], 'params_other': counts['other']}


def flop_count(
        model: nn.Module,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        in_chans: Optional[int] = None,
) -> FlopCountAnalysis:
    """An analysed ``FlopCountAnalysis`` for one image (batch 1), with this module's handles.

    ``.by_operator()`` holds MACs per op kind plus ``elementwise``; ``.unsupported_ops()`` what is left.
    """
    model = unwrap(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape(model, img_size, in_chans), device=device, dtype=dtype)
    analysis = FlopCountAnalysis(model, x)
    for op, handle in _handles().items():
        analysis.set_op_handle(op, handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), count_impl(model):
            analysis.total()
    finally:
        model.train(was_training)
    return analysis


def model_stats(
        model: nn.Module,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        in_chans: Optional[int] = None,
) -> dict:
    """Parameters and compute of ``model`` for one image.

    Returns ``params``, ``params_attn``, ``params_mlp``, ``params_other`` (counts), ``gmacs``
    (1e9 multiply-accumulates, fvcore's unit), ``gflops`` (= 2 x gmacs, the paper's unit), ``size_mb``
    (fp32 weights, MiB), ``gelementwise`` (1e9 element-wise operations, not in gmacs), ``macs_by_op``
    (MACs per op kind) and ``unsupported`` (op kinds no handle counted: empty for the registered models).
    """
    stats = param_breakdown(model)
    analysis = flop_count(model, img_size, in_chans)
    by_op = analysis.by_operator()
    elementwise = by_op.pop('elementwise', 0)
    macs = sum(by_op.values())
    stats.update(
        gmacs=macs / 1e9,
        gflops=2 * macs / 1e9,
        size_mb=stats['params'] * 4 / 2 ** 20,
        gelementwise=elementwise / 1e9,
        macs_by_op={k: int(v) for k, v in sorted(by_op.items())},
        unsupported=sorted(analysis.unsupported_ops()),
    )
    return stats


# ---------------------------------------------------------------------------------------------- command line
# python -m vit_gka.measure.flops MODEL [MODEL ...] [--img-size N] [--json]     (the vit-gka-flops command)

CLI_DESCRIPTION = """\
Parameters and compute of registered timm / vit_gka models, one image each, no training needed.

Markdown table: parameters total / attention / MLP / other in millions, GMACs (1e9 multiply-accumulates as
fvcore counts them), GFLOPs (2 x GMACs, the GKA paper's unit) and the fp32 size in MiB. With --json a JSON
list of objects (model, img_size, params, params_attn, params_mlp, params_other, gmacs, gflops, size_mb,
gelementwise, unsupported). What is counted: the docstring of vit_gka/measure/flops.py."""

CLI_COLUMNS = [  # (row key, table header, divisor)
    ('model', 'model', None),
    ('input', 'input', None),
    ('params', 'params (M)', 1e6),
    ('params_attn', 'attn params (M)', 1e6),
    ('params_mlp', 'MLP params (M)', 1e6),
    ('params_other', 'other params (M)', 1e6),
    ('gmacs', 'GMACs', 1),
    ('gflops', 'GFLOPs (2 x MACs)', 1),
    ('size_mb', 'size (MiB, fp32)', 1),
]
# four significant digits for compute: a small model's 0.0157 GMACs would read 0.02 at two decimals
CLI_FLOAT_FORMATS = {'gmacs': '.4g', 'gflops': '.4g'}
CLI_JSON_KEYS = ('model', 'img_size', 'params', 'params_attn', 'params_mlp', 'params_other', 'gmacs', 'gflops',
                 'size_mb', 'gelementwise', 'unsupported')


class CommandLineError(Exception):
    """A mistake on the command line (an unknown model, a bad option): one line ``error: ...``, exit status 2."""


def _positive_int(text: str) -> int:
    import argparse
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f'needs a positive integer, got {text!r}')
    return int(text)


def cli_parser(prog: Optional[str] = None):
    """The ``argparse`` parser of the command; its errors raise ``CommandLineError``."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise CommandLineError(f'{message} (see {self.prog} --help)')

    parser = Parser(prog=prog or 'python -m vit_gka.measure.flops', description=CLI_DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='+', metavar='MODEL',
                        help="timm model names, e.g. gka_deit_small_patch16_224, or timm wildcards ('gka_deit_*')")
    parser.add_argument('--detail', action='store_true',
                        help="also print fvcore's per-module table (flop_count_table) of each model")
    parser.add_argument('--img-size', type=_positive_int, default=None, metavar='N',
                        help="input height and width (default: the model's own)")
    parser.add_argument('--json', action='store_true', help='print JSON instead of the Markdown table')
    return parser


def _create_model(name: str, img_size: Optional[int] = None) -> nn.Module:
    """``timm.create_model(name)``, at ``img_size`` when the model takes one; ``CommandLineError`` if unknown."""
    import timm
    if not timm.is_model(name):
        raise CommandLineError(f"unknown model {name!r} (not in timm's registry or vit_gka's)")
    if img_size is None:
        return timm.create_model(name)
    try:
        return timm.create_model(name, img_size=img_size)
    except TypeError:  # a model without an img_size argument (e.g. a CNN) takes any input size
        return timm.create_model(name)


def expand_names(names: Sequence[str]) -> List[str]:
    """The model names, each timm wildcard (``*``, ``?``, ``[``) replaced by the registry's matches;
    ``CommandLineError`` for a wildcard that matches nothing."""
    import timm
    out = []
    for name in names:
        if any(c in name for c in '*?['):
            matched = timm.list_models(name)
            if not matched:
                raise CommandLineError(f'{name!r} matches no model in timm\'s registry or vit_gka\'s')
            out += matched
        else:
            out.append(name)
    return out


def stats_row(name: str, img_size: Optional[int] = None, detail: bool = False) -> dict:
    """``model_stats`` of one model with its name, input ``img_size`` [H, W] and ``input`` text (``3x224x224``);
    with ``detail`` also ``table``: fvcore's per-module ``flop_count_table`` (MACs, parameters)."""
    model = _create_model(name, img_size)
    stats = model_stats(model, img_size=img_size)
    shape = input_shape(model, img_size)
    row = {'model': name, 'img_size': list(shape[1:]), 'input': 'x'.join(map(str, shape)), **stats}
    if detail:
        from fvcore.nn import flop_count_table
        row['table'] = flop_count_table(flop_count(model, img_size), max_depth=3)
    return row


def markdown(rows: List[dict]) -> str:
    """The rows as a Markdown table (``CLI_COLUMNS``), then one line per model with ops no handle counted."""
    from tabulate import tabulate
    table = [[r[key] / scale if scale else r[key] for key, _, scale in CLI_COLUMNS] for r in rows]
    text = tabulate(table, headers=[h for _, h, _ in CLI_COLUMNS], tablefmt='github',
                    floatfmt=[CLI_FLOAT_FORMATS.get(key, '.2f') for key, _, _ in CLI_COLUMNS])
    notes = [f'{r["model"]}: ops not counted: {", ".join(r["unsupported"])}' for r in rows if r['unsupported']]
    details = [f'\n{r["model"]}: fvcore per module ("#flops": multiply-accumulates, element-wise ops included)'
               f'\n{r["table"]}' for r in rows if r.get('table')]
    return '\n'.join([text, *notes, *details])


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """The command: prints the table (or JSON) and returns 0; a mistake prints ``error: ...`` and returns 2."""
    import json
    import sys
    try:
        args = cli_parser(prog).parse_args(sys.argv[1:] if argv is None else list(argv))
        rows = [stats_row(name, args.img_size, args.detail) for name in expand_names(args.models)]
    except CommandLineError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{k: r[k] for k in CLI_JSON_KEYS} for r in rows], indent=1))
    else:
        print(markdown(rows))
    return 0


def cli() -> None:
    """The ``vit-gka-flops`` console script."""
    raise SystemExit(main(prog='vit-gka-flops'))


if __name__ == '__main__':
    raise SystemExit(main())
