"""The package's error types and the one-line exit. Imports nothing of the package, so every layer may use it.

``UserError``: a mistake in what the user asked for (a name, a path, a value), reported as one line
``error: <message>`` with exit status 2. ``NonFiniteError``: a run stopped by a non-finite loss or gradient
(exit status 3, the run folder is kept). Real bugs still raise normally.
"""
import os
import re
import sys
from typing import Optional

__all__ = ['UserError', 'NonFiniteError', 'EXIT_USER_ERROR', 'fail', 'require_path']

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for (a name, a path, a value); reported as one line.

    ``input_error``: raised before the task wrote anything (the output folder is put back as it was).
    Raised in a DataLoader worker, PyTorch re-raises it in the main process with the worker's traceback
    folded into the message; only the original message is kept."""
    exit_code = EXIT_USER_ERROR
    input_error = True

    def __init__(self, message: str = ''):
        text = str(message)
        if 'Original Traceback' in text:
            last = [ln for ln in text.splitlines() if ln.strip()][-1]
            text = re.sub(r'^[\w.]*Error: ', '', last.strip())
        super().__init__(text)


class NonFiniteError(UserError):
    """A non-finite loss or gradient stopped the run (not a mistake in the input: the run folder is kept)."""
    exit_code = 3
    input_error = False

    def with_checkpoint(self, last: Optional[str]) -> 'NonFiniteError':
        """This error, with where the last good checkpoint is and what to do."""
        return NonFiniteError(f'{self}; ' + (f'the last good checkpoint is {last}: resume= it with a lower lr, or '
                                             f'set nonfinite=skip' if last else
                                             'no checkpoint was written yet: lower lr, or set nonfinite=skip'))


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print ``error: message`` (one line) to stderr and exit with ``code``; other processes of a distributed
    run exit with ``code`` silently."""
    if os.environ.get('RANK', '0') == '0':
        line = ' '.join(str(message).split())
        sys.stderr.write(f'error: {line}\n')
        sys.stderr.flush()
    raise SystemExit(code)


def require_path(path: Optional[str], what: str) -> str:
    """The absolute path of ``path`` if it exists, else a ``UserError`` naming ``what``."""
    if path is None or str(path) == '':
        raise UserError(f'{what} is not set')
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(full):
        raise UserError(f'{what} does not exist: {path}')
    return full
