"""Faults for the writers' tests: a small file system that fills up (a tmpfs, where root may
mount one), and a command killed with SIGKILL part-way through a write."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT


@contextlib.contextmanager
def small_file_system(folder: Path, size: str = "2m", fill: bool = False):
    """A tmpfs of ``size`` mounted at ``folder`` (skips where mounting is not permitted);
    with ``fill``, filled up before the test writes to it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        if fill:
            with open(folder / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


def free_bytes(folder: Path) -> int:
    fs = os.statvfs(folder)
    return fs.f_bavail * fs.f_frsize


def kill_midway(code: str, ready: str = "writing", timeout: float = 120) -> int:
    """Run ``code`` in a fresh Python, wait until it prints ``ready`` (from inside the write
    it stalls), SIGKILL it; returns its pid."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip() == ready, (line, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def is_enospc_message(text: str) -> bool:
    return os.strerror(errno.ENOSPC) in text
