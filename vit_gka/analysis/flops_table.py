"""Parameter and compute table for any registered or timm model, no training needed.

    python -m vit_gka.analysis.flops_table MODEL [MODEL ...] [--img-size N] [--json]

Markdown table (parameters total / attention / MLP / other in millions, GMACs = 1e9 multiply-accumulates
as fvcore counts them, GFLOPs = 2 x GMACs as the GKA paper reports them, fp32 size in MiB), or with
``--json`` a JSON list of objects (model, img_size, params, params_attn, params_mlp, params_other, gmacs,
gflops, size_mb, gelementwise, unsupported). See vit_gka/flops.py for what is counted.
"""
import json
import sys
from typing import List, Optional

import timm
from tabulate import tabulate

import vit_gka  # noqa: F401  (registers gka_deit_* / vlt_deit_*)
from vit_gka.analysis.flops import input_shape, model_stats

USAGE = 'usage: python -m vit_gka.analysis.flops_table MODEL [MODEL ...] [--img-size N] [--json]'

COLUMNS = [
    ('model', 'model', None),
    ('input', 'input', None),
    ('params', 'params (M)', 1e6),
    ('params_attn', 'attn params (M)', 1e6),
    ('params_mlp', 'MLP params (M)', 1e6),
    ('params_other', 'other params (M)', 1e6),
    ('gmacs', 'GMACs', 1),
    ('gflops', 'GFLOPs (2 x MACs)', 1),
    ('size_mb', 'size (MB, fp32)', 1),
]


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit code 2."""


def parse_args(argv: List[str]) -> dict:
    args = {'models': [], 'img_size': None, 'json': False}
    it = iter(argv)
    for arg in it:
        if arg in ('-h', '--help'):
            print(USAGE)
            print(__doc__.strip().split('\n\n', 2)[-1])
            sys.exit(0)
        elif arg == '--json':
            args['json'] = True
        elif arg == '--img-size' or arg.startswith('--img-size='):
            value = arg.split('=', 1)[1] if '=' in arg else next(it, None)
            if value is None or not value.isdigit() or int(value) <= 0:
                raise UsageError(f'--img-size needs a positive integer, got {value!r}')
            args['img_size'] = int(value)
        elif arg.startswith('-'):
            raise UsageError(f'unknown option {arg!r}')
        else:
            args['models'].append(arg)
    if not args['models']:
        raise UsageError('give at least one model name')
    return args


def create(name: str, img_size: Optional[int]):
    """``timm.create_model(name)``, at ``img_size`` when the model takes one."""
    if not timm.is_model(name):
        raise UsageError(f'unknown model {name!r} (not in timm\'s registry or vit_gka\'s)')
    if img_size is None:
        return timm.create_model(name)
    try:
        return timm.create_model(name, img_size=img_size)
    except TypeError:  # a model without an img_size argument (e.g. a CNN) takes any input size
        return timm.create_model(name)


def stats_row(name: str, img_size: Optional[int]) -> dict:
    model = create(name, img_size)
    stats = model_stats(model, img_size=img_size)
    shape = input_shape(model, img_size)
    return {'model': name, 'img_size': list(shape[1:]), 'input': 'x'.join(map(str, shape)), **stats}


def markdown(rows: List[dict]) -> str:
    table = [[r[key] / scale if scale else r[key] for key, _, scale in COLUMNS] for r in rows]
    text = tabulate(table, headers=[h for _, h, _ in COLUMNS], tablefmt='github', floatfmt='.2f')
    notes = [f'{r["model"]}: ops not counted: {", ".join(r["unsupported"])}' for r in rows if r['unsupported']]
    return '\n'.join([text, *notes])


def main(argv: List[str]) -> int:
    try:
        args = parse_args(argv)
        rows = [stats_row(name, args['img_size']) for name in args['models']]
    except UsageError as e:
        print(f'error: {e}\n{USAGE}', file=sys.stderr)
        return 2
    if args['json']:
        keep = ('model', 'img_size', 'params', 'params_attn', 'params_mlp', 'params_other', 'gmacs', 'gflops',
                'size_mb', 'gelementwise', 'unsupported')
        print(json.dumps([{k: r[k] for k in keep} for r in rows], indent=1))
    else:
        print(markdown(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
