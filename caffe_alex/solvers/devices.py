"""Where nets run: the one place a device is chosen, by Caffe's precedence (caffe.cpp): the
``--gpu`` flag (or pycaffe's set_mode_gpu/set_device, its equivalent), then the solver file's
solver_mode/device_id (only when the file sets solver_mode: its default, GPU, chooses nothing),
then the CPU. Every command, the Solver and pycaffe ask here."""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError
from ..log import get_logger


def gpu_spec(flag: str | None, solver_param=None) -> str:
    """The ``--gpu`` value in force: the flag when given, else the solver file's GPU
    (solver_mode: GPU with its device_id, 0 when unset), else "" (the CPU)."""
    if flag:
        return str(flag).strip()
    if solver_param is not None and solver_param.HasField("solver_mode") \
            and solver_param.solver_mode == solver_param.GPU:  # fmt: skip
        return str(solver_param.device_id) if solver_param.HasField("device_id") else "0"
    return ""


def gpu_ids(spec: str | None) -> list[int]:
    """The GPUs a ``--gpu`` value names (Caffe's get_gpus), checked against this machine: [] for
    the CPU ('none', 'cpu' or no value), every device for 'all', else the listed ids. Without
    CUDA a single id falls back to the CPU with a warning; 'all' or a list stops."""
    spec = (spec or "").strip()
    if spec in ("", "none", "cpu"):
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "all":
        if not count:
            raise CaffeAlexError("--gpu all: no CUDA device is available (--gpu none runs on "
                                 "the CPU)")  # fmt: skip
        return list(range(count))
    try:
        ids = [int(part) for part in spec.split(",")]
    except ValueError:
        ids = [-1]
    if min(ids) < 0:
        raise CaffeAlexError(f"--gpu {spec}: expected GPU ids (0, or 0,1), 'all' or 'none'")
    if not count:
        if len(ids) == 1:
            get_logger().warning("no CUDA device available; using the CPU")
            return []
        raise CaffeAlexError(f"--gpu {spec}: no CUDA device is available (--gpu none runs on "
                             "the CPU)")  # fmt: skip
    missing = [i for i in ids if i >= count]
    if missing:
        raise CaffeAlexError(
            f"--gpu {spec}: there is no GPU {missing[0]}; this machine has {count} "
            f"(ids {', '.join(map(str, range(count)))})"
        )
    return ids


def choose_device(flag=None, solver_param=None) -> torch.device:
    """The device of one process: ``flag`` (a ``--gpu`` value, or a torch.device / "cuda:1"
    given by code), else the solver file's GPU, else the CPU; the first GPU of several."""
    if isinstance(flag, torch.device) or (isinstance(flag, str) and flag.startswith("cuda")):
        flag = torch.device(flag)
        return flag if flag.type != "cuda" else torch.device("cuda", flag.index or 0)
    ids = gpu_ids(gpu_spec(flag, solver_param))
    return torch.device("cuda", ids[0]) if ids else torch.device("cpu")
