"""Keep freed host memory for reuse, as Caffe keeps its blobs.

glibc serves a request over its mmap threshold (at most 32 MB) with a fresh mmap and returns it
to the kernel on free. A training step on the CPU allocates and frees the same large tensors
every iteration (AlexNet's conv1/norm1 outputs are 37 MB at batch 32), so each iteration paid
the kernel to map and zero them again: a 37 MB elementwise op took 15 ms instead of 2.5, LRN's
forward + backward 159 ms instead of 75, a whole AlexNet iteration 1.40 s instead of 1.19
(docs/benchmarks.md). Caffe allocates its blobs once; PyTorch's CUDA allocator caches; on the
CPU PyTorch leaves it to malloc. ``keep_freed_memory`` tells glibc to serve every request from
its heap (no mmap) and to give the heap back only beyond 2 GiB free at its top, so freed
blocks are reused without faults. The process keeps its peak footprint, as Caffe and a CUDA
cache do (AlexNet at batch 256: 5.77 GB peak RSS, against 4.67 GB without this and Caffe's
4.66 GB).

Not applied where the user chose: ``CAFFE_ALEX_MALLOC=system``, any ``MALLOC_*`` setting, a
``GLIBC_TUNABLES`` malloc tunable, or another allocator preloaded (jemalloc, tcmalloc), and
nowhere but on glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_MAX = -4
_TRIM_ABOVE = 2**31 - 1  # bytes free at the heap's top before it shrinks (mallopt takes an int)


def user_chose_allocator(environ=os.environ) -> bool:
    """Whether the environment already says how malloc should behave."""
    if environ.get("CAFFE_ALEX_MALLOC", "").lower() == "system":
        return True
    if any(name.startswith("MALLOC_") for name in environ):
        return True
    if "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(lib in environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True where it took effect."""
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its libc (no ldconfig lookup)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl has no gnu_get_libc_version)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 where it took the setting
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
