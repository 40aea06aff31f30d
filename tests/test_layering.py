"""The package's layers: the models import without the training stack, the attention layers need torch and
entmax only, and no vit_gka module imports another that (directly or not) imports it back."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'vit_gka')

BLOCKED = ('hydra', 'accelerate', 'tensorboard', 'torch.utils.tensorboard')

SCRIPT = textwrap.dedent('''
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + '.') for b in BLOCKED):
                raise ImportError(f'{{name}} is blocked in this test')
            return None

    sys.meta_path.insert(0, Blocker())

    import timm
    import torch
    import vit_gka

    names = timm.list_models(['gka_deit_*', 'vlt_deit_*', '?ka_*_deit_*'])  # the last matches gka_[qk]_deit_* too
    assert len(names) == 28, names
    with torch.device('meta'):
        for name in names:
            model = timm.create_model(name)
            assert next(model.parameters()).device.type == 'meta'
    loaded = [m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in BLOCKED)]
    assert not loaded, loaded
    print('built', len(names))
''')


def test_models_build_without_the_training_stack():
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-c', SCRIPT.format(blocked=BLOCKED)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'built 28' in proc.stdout


# the folders of the installed package vit_gka (pyproject's package-dir): the top-level analysis/ and conf/ in it
FOLDERS = {'vit_gka': 'vit_gka', 'analysis': 'vit_gka.analysis', 'conf': 'vit_gka.conf'}


def module_name(path):
    top, _, rel = os.path.relpath(path, ROOT)[:-len('.py')].partition(os.sep)
    name = '.'.join([FOLDERS[top], *rel.split(os.sep)])
    return name[:-len('.__init__')] if name.endswith('.__init__') else name


def modules():
    """{module name: path} of every module of the installed package vit_gka."""
    found = {}
    for top in FOLDERS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith('.py'):
                    found[module_name(os.path.join(dirpath, f))] = os.path.join(dirpath, f)
    return found


def test_nothing_in_the_package_folder_imports_the_report():
    """analysis/ reads the package; the package (vit_gka/) never imports analysis/, at any depth of a module."""
    found = {name: [m for m in imports(name, path, top_level_only=False) if m.startswith('vit_gka.analysis')]
             for name, path in modules().items() if path.startswith(PACKAGE + os.sep)}
    assert {name: m for name, m in found.items() if m} == {}


def imports(name, path, top_level_only):
    """Absolute names of the modules ``name`` imports (``from a import b`` yields a and, if it is one, a.b)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    is_package = path.endswith('__init__.py')
    nodes = []
    todo = list(tree.body)
    while todo:  # module-level statements, including those under if / try / with
        node = todo.pop()
        nodes.append(node)
        if top_level_only:
            for field in ('body', 'orelse', 'finalbody', 'handlers'):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                    todo.extend(getattr(node, field, []) or [])
        else:
            todo.extend(ast.iter_child_nodes(node))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = name.split('.')
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f'{base}.{alias.name}' for alias in node.names)
    return out


def test_attention_layers_need_torch_and_entmax_only():
    """The layers import torch and entmax; triton only in the Triton kernels' module, which gka_triton imports when
    impl='triton' first runs (torch's Linux wheels bring triton; elsewhere the layers work without it)."""
    allowed_third_party = {'torch', 'entmax'}
    for name, path in modules().items():
        if not name.startswith('vit_gka.layers'):
            continue
        allowed = allowed_third_party | ({'triton'} if name.startswith('vit_gka.layers.gka_triton') else set())
        for imported in imports(name, path, top_level_only=False):
            top = imported.split('.')[0]
            if top == 'vit_gka':
                assert imported.startswith('vit_gka.layers'), (name, imported)
            else:
                assert top in allowed or top in sys.stdlib_module_names, (name, imported)
    eager = [m for m in imports('vit_gka.layers.gka_triton', modules()['vit_gka.layers.gka_triton'], top_level_only=True)
             if m.split('.')[0] == 'triton' or m.startswith('vit_gka.layers.gka_triton_kernels')]
    assert not eager, f'gka_triton imports {eager} at import time: only when its kernels run'


def test_no_import_cycles():
    mods = modules()
    graph = {name: sorted(m for m in imports(name, path, top_level_only=True) if m in mods and m != name)
             for name, path in mods.items()}
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for nxt in graph[node]:
            if state.get(nxt) == 'open':
                pytest.fail('import cycle: ' + ' -> '.join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
