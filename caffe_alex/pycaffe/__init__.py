"""The pycaffe compatibility layer: what ``import caffe`` gives (the top-level ``caffe`` package
re-exports this). Existing pycaffe code runs unchanged: nets and their blobs, Python layers,
solvers, NetSpec, caffe.io, caffe.draw, coord_map, Classifier and Detector.

A real pycaffe earlier on ``sys.path`` still wins, as Python's import order gives it.
"""

from ..layers import layer_types as layer_type_list
from ..layers.python import Layer
from ..proto.caffe_pb2 import TEST, TRAIN
from ..solvers import distributed
from .net import Net
from .runtime import (
    Timer,
    init_log,
    log,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
    set_multiprocess,
    set_random_seed,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)
from .solver import (
    NCCL,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
)

__version__ = "1.0.0"  # the pycaffe API version this layer follows (BVLC Caffe 1.0)


def has_nccl() -> bool:
    """Whether caffe.NCCL can join solvers of several processes: torch.distributed (NCCL
    between GPUs, gloo between CPUs) is there."""
    return distributed.dist.is_available()


__all__ = [
    "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Layer", "NCCL", "Net", "NesterovSolver",
    "RMSPropSolver", "SGDSolver", "TEST", "TRAIN", "Timer", "get_solver", "has_nccl",
    "init_log", "layer_type_list", "log", "set_device", "set_mode_cpu", "set_mode_gpu",
    "set_multiprocess", "set_random_seed", "set_solver_count", "set_solver_rank",
    "solver_count", "solver_rank",
]  # fmt: skip
