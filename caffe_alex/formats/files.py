"""Writing files so that an interrupted write never leaves a broken file under the final name."""

from __future__ import annotations

import contextlib
import os
import secrets

from ..errors import CaffeAlexError


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over
    ``path``, so an interrupted write never leaves a truncated file under the final name."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as exc:
        raise CaffeAlexError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
