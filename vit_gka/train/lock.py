"""One writer per run folder (``RunLock``). The main process holds an exclusive ``fcntl.flock`` on
``<run>/run.lock`` (pid, host and start time written in it) while it writes the folder. A second run on the
folder stops at once in one line naming the holder, exit status 2, before it writes anything (``check_free``
runs before Hydra writes ``.hydra/``; ``RunLock.acquire`` again before the job's first write). The OS drops the
lock when its process dies (also ``kill -9``): a requeued job takes the folder over; a lock that is still held
although its pid is gone on this host (a leftover child holding the file) is stale and taken over too. The
file is removed when the run ends.
"""
import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional

from vit_gka.errors import UserError

__all__ = ['LOCK_FILE', 'RunLock', 'check_free']

log = logging.getLogger('vit_gka.train')

LOCK_FILE = 'run.lock'

_held: List['RunLock'] = []  # locks of this process: their descriptors are closed in forked children


def _close_in_child() -> None:
    for lock in _held:
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)  # the child's copy only: the parent keeps the lock
            lock.fd = None
    _held.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_close_in_child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder(fd: int) -> Dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode() or '{}')
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(holder: Dict[str, Any]) -> bool:
    """A lock still held although the process that wrote it is gone from this host."""
    pid = holder.get('pid')
    return holder.get('host') == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _in_use(folder: str, holder: Dict[str, Any]) -> UserError:
    since = holder.get('since')
    when = time.strftime(' since %Y-%m-%d %H:%M:%S', time.localtime(since)) if isinstance(since, (int, float)) else ''
    who = (f"process {holder.get('pid')} on {holder.get('host')}{when}" if holder.get('pid') else 'another process')
    return UserError(f'run folder {folder} is in use by {who} ({os.path.join(folder, LOCK_FILE)}); wait for it to '
                     f'end, or give another hydra.run.dir=<folder>')


def check_free(folder: str) -> None:
    """``UserError`` when another live process holds ``folder``'s lock; changes nothing in ``folder``."""
    path = os.path.join(os.path.abspath(folder), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if not _stale(holder):
            raise _in_use(os.path.dirname(path), holder) from None
    except OSError:  # a file system without flock: RunLock.acquire decides
        return
    finally:
        os.close(fd)  # (and with it a lock just taken)


class RunLock:
    """The exclusive lock of one run folder (module docstring): ``acquire()``, ``release()`` (also at exit)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.fd: Optional[int] = None
        self.pid = os.getpid()

    def acquire(self) -> 'RunLock':
        """Take the folder, or raise ``UserError`` naming the live process that holds it."""
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not _stale(holder):
                    os.close(fd)
                    raise _in_use(self.folder, holder) from None
                log.warning('taking over the lock of process %s (gone) on %s', holder.get('pid'), self.folder)
                self._unlink_if(fd)
                os.close(fd)
                continue
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                log.warning('%s: file locks are not supported here; nothing stops a second run on this folder',
                            self.path)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by its last holder (or taken over) after we opened it: again
                os.close(fd)
                continue
            record = json.dumps({'pid': self.pid, 'host': socket.gethostname(), 'since': time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + '\n').encode(), 0)
            self.fd = fd
            _held.append(self)
            atexit.register(self.release)
            return self
        raise UserError(f'could not lock {self.path}: it keeps changing; is another run starting on {self.folder}?')

    def _unlink_if(self, fd: int) -> None:
        """Remove the lock file if ``fd`` is still what it names."""
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent; nothing in a forked child)."""
        if self.fd is None or os.getpid() != self.pid:
            return
        self._unlink_if(self.fd)
        os.close(self.fd)
        self.fd = None
        if self in _held:
            _held.remove(self)
