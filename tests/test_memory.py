"""The allocator policy of memory.py: large tensors freed and allocated again are reused
instead of mapped afresh, counted in page faults (no timing), and the user's choice wins."""

import subprocess
import sys

import pytest

from caffe_alex.memory import user_chose_allocator

# 16 rounds of a 64 MB tensor allocated, written and freed; the faults of the last four
FAULTS = """
import resource, caffe_alex, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(16):
    before = faults()
    t = torch.ones(16 << 20)
    del t
    counts.append(faults() - before)
print(caffe_alex.KEEPS_FREED_MEMORY, sum(counts[-4:]))
"""


def _last_faults(env_update: dict) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("CAFFE_ALEX_MALLOC", None)
    done = subprocess.run([sys.executable, "-c", FAULTS], env={**env, **env_update},
                          capture_output=True, text=True, check=True)  # fmt: skip
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_tensors_are_reused_without_page_faults():
    kept, faults = _last_faults({})
    assert kept == "True" and faults < 64
    # the same rounds with the policy off map and fault every time (4 KiB or 2 MiB pages)
    kept, faults = _last_faults({"CAFFE_ALEX_MALLOC": "system"})
    assert kept == "False" and faults >= 64


@pytest.mark.parametrize(
    "environ,chose",
    [
        ({}, False),
        ({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, False),
        ({"CAFFE_ALEX_MALLOC": "system"}, True),
        ({"CAFFE_ALEX_MALLOC": "System"}, True),
        ({"MALLOC_ARENA_MAX": "2"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, True),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ],
)
def test_the_users_allocator_choice_wins(environ, chose):
    assert user_chose_allocator(environ) is chose
