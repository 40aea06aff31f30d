"""README's file map is the whole tree: every tracked file of vit_gka/, conf/, analysis/, benchmarks/, scripts/ and tests/ has its
line, and every line names a file that exists."""
import os
import re
import subprocess

import pytest

from helpers import ROOT

FOLDERS = ('vit_gka/', 'conf/', 'analysis/', 'benchmarks/', 'scripts/', 'tests/')


def map_paths():
    """The paths of README's file map, from its indentation (two spaces a level)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    block = re.search(r'## File map\s+```\n(.*?)```', text, re.S).group(1)
    stack, paths = [], set()
    for line in block.splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip(' '))) // 2
        stack[depth:] = [name]
        if not name.endswith('/'):
            paths.add(''.join(stack))
    return paths


def test_every_tracked_file_has_its_line():
    proc = subprocess.run(['git', 'ls-files', *FOLDERS], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip('not a git checkout')
    tracked = set(proc.stdout.split())
    listed = map_paths()
    assert sorted(tracked - listed) == [], 'add these files to README.md "File map"'
    assert sorted(p for p in listed if not os.path.exists(os.path.join(ROOT, p))) == [], 'gone: remove from the map'
