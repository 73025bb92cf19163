"""One-line error text for files: library errors cleaned up, a full disk told apart."""

from __future__ import annotations

import pytest

from caffe_alex.errors import describe
from caffe_alex.formats.file_errors import no_space


class _Plyvel(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (ValueError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1d9e40>"),
         "cannot identify image file the data"),
        (RuntimeError("first line\n\n  second\tline "), "first line second line"),
        (_Plyvel(b"IO error: db/000003.log: No space left on device"),
         "IO error: db/000003.log: No space left on device"),
        (_Plyvel(b"bad \xff byte"), "bad \\xff byte"),
        (FileNotFoundError(2, "No such file or directory"), "No such file or directory"),
        (FileNotFoundError(2, "Unable to synchronously create file (errno = 2, ...)"),
         "No such file or directory"),  # h5py's OSError: the OS's reason, not h5py's diagnostic
        (KeyError(), "KeyError"),
    ],
)  # fmt: skip
def test_describe_gives_clean_one_line_text(exc, text):
    assert describe(exc) == text
    assert no_space(_Plyvel("x: No space left on device"))
