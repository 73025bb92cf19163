"""pycaffe's global state: the mode (CPU or GPU, as Caffe::set_mode), the device, the random
seed, and Caffe's logging calls."""

from __future__ import annotations

import logging
import time

import torch

from ..errors import CaffeAlexError
from ..log import get_logger, setup_logging

_state = {"gpu": False, "device_id": 0, "seed": None}


def set_mode_cpu() -> None:
    _state["gpu"] = False


def set_mode_gpu() -> None:
    """Run nets on GPU ``set_device``; without CUDA this says so and keeps the CPU."""
    if not torch.cuda.is_available():
        get_logger().warning("set_mode_gpu: no CUDA device is available; staying on the CPU")
        return
    _state["gpu"] = True


def set_device(device_id: int) -> None:
    if torch.cuda.is_available() and not 0 <= device_id < torch.cuda.device_count():
        raise CaffeAlexError(
            f"set_device({device_id}): there are {torch.cuda.device_count()} CUDA devices"
        )
    _state["device_id"] = int(device_id)


def device() -> torch.device:
    if _state["gpu"]:
        return torch.device("cuda", _state["device_id"])
    return torch.device("cpu")


def set_random_seed(seed: int) -> None:
    """Seeds torch (fillers, dropout, stochastic pooling) and the data feeds made from now on."""
    _state["seed"] = int(seed)
    torch.manual_seed(int(seed))


def seed() -> int | None:
    return _state["seed"]


def init_log(level: int = 0, stderr: bool = True) -> None:
    """Caffe's glog set-up: messages of ``level`` and above (0 INFO, 1 WARNING, 2 ERROR)."""
    levels = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
    setup_logging(levels.get(int(level), logging.INFO))


def log(message: str) -> None:
    get_logger().info(message)


# -- Caffe's multi-process solver counters: a solver built while solver_count() > 1 is rank
# solver_rank() of that many, joined to the others by caffe.NCCL (solver.py)
_solvers = {"count": 1, "rank": 0, "multiprocess": False}


def solver_count() -> int:
    return _solvers["count"]


def set_solver_count(count: int) -> None:
    _solvers["count"] = int(count)


def solver_rank() -> int:
    return _solvers["rank"]


def set_solver_rank(rank: int) -> None:
    _solvers["rank"] = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    _solvers["multiprocess"] = bool(multiprocess)


class Timer:
    """caffe.Timer: ``start()``, ``stop()``, ``ms`` (wall-clock milliseconds, the GPU
    synchronised first in GPU mode as Caffe's GPU timer measures device time)."""

    def __init__(self):
        self._start: float | None = None
        self._elapsed = 0.0

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self._sync()
            self._elapsed = time.perf_counter() - self._start
            self._start = None

    @property
    def ms(self) -> float:
        if self._start is not None:
            self.stop()
        return self._elapsed * 1000.0

    @staticmethod
    def _sync() -> None:
        if _state["gpu"]:
            torch.cuda.synchronize(device())
