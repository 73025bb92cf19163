"""Net's thread policy: whether a net runs PyTorch's CPU ops on one thread, and the block that
does so."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import CaffeAlexError
from ..registry import Shape, tracing
from .plan import ParamInfo

# A net whose every blob and learnable blob is under this many elements runs on one thread
# (thread_policy "auto"): its ops are too short for a second thread to pay for its wake-up, and
# some of PyTorch's kernels (softmax, log_softmax and their backward over the last axis) start
# the pool for any input, even 10 x 2, which costs milliseconds on a busy machine. PyTorch's
# own element-wise kernels split work only above this size (at::internal::GRAIN_SIZE).
ONE_THREAD_ELEMENTS = 32768
THREAD_POLICIES = ("auto", "pool", "one")


def policy_says_one(policy: str) -> bool:
    """Whether a policy other than "auto" means one thread; an unknown one is refused."""
    if policy not in THREAD_POLICIES:
        raise CaffeAlexError(f"thread_policy must be one of {THREAD_POLICIES}, got "
                             f"{policy!r}")  # fmt: skip
    return policy == "one"


def is_small(blob_shapes: Mapping[str, Shape], param_infos: Iterable[ParamInfo]) -> bool:
    """Whether every blob and learnable blob is under ONE_THREAD_ELEMENTS."""
    sizes = [math.prod(s) for s in blob_shapes.values()]
    sizes += [info.param.numel() for info in param_infos]
    return max(sizes, default=0) < ONE_THREAD_ELEMENTS


def thread_block(one_thread: Callable[[], bool]) -> contextlib.AbstractContextManager:
    """One thread for the block where ``one_thread()`` says so (asked only when it matters),
    else a block that changes nothing."""
    if tracing() or not one_thread() or torch.get_num_threads() == 1:
        return contextlib.nullcontext()  # (torch.compile and export trace no thread count)
    return _OneThread()


class _OneThread:
    """Sets PyTorch's intra-op threads to 1 for its block, then back to what they were."""

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
