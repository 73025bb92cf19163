"""One-line errors for files: a path that is not a file to read, a failed write (a full disk
told apart from other causes, also where a library reports it without the OS's reason)."""

from __future__ import annotations

import errno
import os

from ..errors import CaffeAlexError, describe


def regular_file(path) -> str:
    """``path``, after checking that it is a file to read: a missing path, a folder or a
    FIFO or device (opening a FIFO would wait for a writer forever) is one line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CaffeAlexError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CaffeAlexError(f"is a folder, not a file: {path}")
    if not os.path.isfile(path):
        raise CaffeAlexError(f"not a regular file: {path}")
    return path


def write_error(path, exc: BaseException, wanted: int = 0) -> CaffeAlexError:
    """The one-line error for a failed write of ``path`` (``wanted``: bytes being written)."""
    path = os.fspath(path)
    full = no_space(exc, os.path.dirname(os.path.abspath(path)), wanted)
    reason = os.strerror(errno.ENOSPC) if full else describe(exc)
    return CaffeAlexError(f"cannot write {path}: {reason}")


def no_space(exc: BaseException, folder: str | None = None, wanted: int = 0) -> bool:
    """Whether ``exc`` says the file system is full; or, for a short write reported without
    the OS's reason (numpy's "N requested and M written", LMDB's EIO), whether the free space
    left in ``folder`` says so."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc):
        return True
    if folder is None or getattr(exc, "errno", None) not in (None, errno.EIO):
        return False
    try:
        fs = os.statvfs(folder)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < wanted + (1 << 20)
