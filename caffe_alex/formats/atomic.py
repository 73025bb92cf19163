"""Writing files so that an interrupted write never leaves a broken file under the final name.

A write goes to a temporary beside the destination, named ``.<name>.caffe-alex-<pid>-<n>.tmp``
(a file, or a folder for a database), and is renamed over the destination when complete. A
process killed mid-write leaves its temporary behind; the next write of the same destination
removes the temporaries whose process is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil

from .file_errors import write_error

_SEQUENCE = itertools.count()  # two writes of one destination in one process get two names
_NAME_BYTES = 200  # the destination's name in a temporary is cut to keep it under NAME_MAX


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))  # "out_lmdb/" is out_lmdb
    raw = name.encode("utf-8", "surrogateescape")[:_NAME_BYTES]
    return raw.decode("utf-8", "surrogateescape")  # a cut inside a character stays a surrogate


def temporary_path(path) -> str:
    """A fresh temporary name beside ``path`` for this process, after removing the stale
    temporaries of ``path`` that killed processes left."""
    path = os.fspath(path)
    remove_stale_temporaries(path)
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{_stem(path)}.caffe-alex-{os.getpid()}-{next(_SEQUENCE)}.tmp")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False  # no writer has this id (and kill(0) would mean the process group)
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_stale_temporaries(path) -> list[str]:
    """Remove the temporaries of ``path`` whose writing process no longer exists; returns them.
    (A temporary of a process on another machine sharing the folder cannot be told from a
    stale one; such a concurrent write then fails cleanly at its rename.)"""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(_stem(path))}\.caffe-alex-(\d+)-\d+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed  # the write itself reports an unusable folder
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _alive(int(match[1])):
            continue
        stale = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.unlink(stale)
            removed.append(stale)
    return removed


def remove_path(path: str) -> None:
    """Remove a file or a folder tree; nothing if it is not there."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over
    ``path``, so an interrupted write never leaves a truncated file under the final name."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        remove_path(tmp)
