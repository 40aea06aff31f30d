"""What Hydra writes into an existing output folder before a job runs (``.hydra/``, the job log), remembered
before Hydra runs and put back when the job then fails on its input (cli.exit_on_user_error): a mistake leaves
existing folders as they were, and a folder Hydra made for the failed job is removed."""
import os
import shutil
from typing import Any, Dict, List

from vit_gka.errors import UserError

HYDRA_FILES: Dict[str, Dict[str, Any]] = {}  # output folder -> what Hydra will touch, as it was
EXISTING: List[str] = []  # the nearest existing ancestor of the output folder, before Hydra ran


def snapshot(folder: str) -> Dict[str, Any]:
    """What Hydra will touch in an existing output folder: ``.hydra/*`` contents (None: no .hydra/) and the
    sizes of the ``*.log`` files."""
    hydra_dir = os.path.join(folder, '.hydra')
    hydra = None
    if os.path.isdir(hydra_dir):
        hydra = {}
        for name in os.listdir(hydra_dir):
            with open(os.path.join(hydra_dir, name), 'rb') as f:
                hydra[name] = f.read()
    logs = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
            if n.endswith('.log') and os.path.isfile(os.path.join(folder, n))}
    return {'hydra': hydra, 'logs': logs}


def put_back(folder: str) -> None:
    """Undo what Hydra wrote into ``folder`` for a job that failed on its input."""
    folder = os.path.abspath(folder)
    before = HYDRA_FILES.get(folder)
    if before is None:  # a folder Hydra made for this job: remove it (and the parents it made) if it holds nothing else
        names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if names and all(n == '.hydra' or n.endswith('.log') for n in names):
            shutil.rmtree(folder, ignore_errors=True)
            parent = os.path.dirname(folder)
            while EXISTING and parent.startswith(EXISTING[0] + os.sep) and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)
        return
    hydra_dir = os.path.join(folder, '.hydra')
    if before['hydra'] is None:
        shutil.rmtree(hydra_dir, ignore_errors=True)
    else:
        for name in os.listdir(hydra_dir) if os.path.isdir(hydra_dir) else []:
            if name not in before['hydra']:
                os.remove(os.path.join(hydra_dir, name))
        for name, data in before['hydra'].items():
            path = os.path.join(hydra_dir, name)
            if not os.path.isfile(path) or open(path, 'rb').read() != data:
                with open(path, 'wb') as f:
                    f.write(data)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith('.log') and os.path.isfile(path):
            if name in before['logs']:
                os.truncate(path, before['logs'][name])
            else:
                os.remove(path)


def check_output_dir(path: str, key: str = 'hydra.run.dir') -> str:
    """``UserError`` when the folder ``path`` cannot be created or written (its nearest existing ancestor is
    a file, or is not writable); else that nearest existing ancestor (``path`` itself if it exists)."""
    probe = os.path.abspath(os.path.expanduser(str(path)))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f'cannot create the output folder {path}: {probe} is a file; choose another {key}=<folder>')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'cannot write the output folder {path}: {probe} is not writable; '
                        f'choose another {key}=<folder>')
    return probe
