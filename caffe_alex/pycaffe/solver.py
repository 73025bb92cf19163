"""pycaffe's solvers: ``caffe.SGDSolver(filename)`` and its siblings, ``caffe.get_solver``,
and ``caffe.NCCL``, which joins the solvers of several processes as pycaffe's python/train.py
does (one process per GPU) into the training ``caffe-alex train --gpu 0,1`` runs.

Each runs caffe_alex's Solver (Caffe's training loop and update rules) with Caffe's Split
layers in its nets, run as Caffe runs them (the solver's ``layerwise`` engines: persistent
blobs, layer by layer); ``solver.net`` and ``solver.test_nets`` are pycaffe Nets over those
very blobs and the same data feeds, so ``solver.net.forward()`` draws the batch the next step
would have drawn, as Caffe's shared data layer does, after ``step`` every blob holds the last
iteration's data and diff, and ``net.after_backward`` callbacks run within each iteration.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile

import torch

from ..errors import CaffeAlexError
from ..formats.prototxt import read_solver
from ..solvers import distributed
from ..solvers.coordination import Waiting
from ..solvers.lr_policy import learning_rate
from ..solvers.solver import Solver as CoreSolver
from . import runtime
from .net import Net


class Solver:
    """The solver type comes from the class (``caffe.AdamSolver(f)`` is Adam whatever ``f``'s
    ``type`` says, as in Caffe); ``get_solver`` picks the class from the file."""

    solver_type: str | None = None

    def __init__(self, filename):
        filename = os.fspath(filename)
        param = read_solver(filename)
        if self.solver_type is not None:
            param.type = self.solver_type
        # Caffe: the solver file's random_seed, when set, reseeds over set_random_seed's
        seed = runtime.seed() if param.random_seed < 0 else None
        # Caffe: a solver made while solver_count() > 1 is rank solver_rank() (its seed, its
        # share of the records, test nets on rank 0 only); caffe.NCCL joins it to the others
        count = runtime.solver_count()
        rank = Waiting(runtime.solver_rank(), count) if count > 1 else None
        self._solver = CoreSolver(param, source_path=filename, device=runtime.device(),
                                  seed=seed, insert_splits=True, world=rank,
                                  layerwise=True)  # fmt: skip
        core = self._solver
        self.net = Net.wrap(core.engines["train"].executor)
        self.test_nets = [Net.wrap(core.engines[i].executor) for i in range(len(core.test_nets))]

    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def param(self):
        return self._solver.param

    @property
    def type(self) -> str:
        return self._solver.param.type

    @property
    def lr(self) -> float:
        """The learning rate of the current iteration (SGDSolver::GetLearningRate)."""
        return learning_rate(self.param, self.iter, self._solver.current_step)[0]

    def step(self, iters: int) -> None:
        self._solver.step(int(iters))

    def solve(self, resume=None) -> None:
        self._solver.solve(os.fspath(resume) if resume is not None else None)

    def snapshot(self) -> None:
        self._solver.snapshot()

    def restore(self, state_file) -> None:
        self._solver.restore(os.fspath(state_file))

    def apply_update(self) -> None:
        self._solver.apply_update()

    def share_weights(self, net: Net) -> None:
        """Let ``net`` use this solver's trained blobs (layers named alike)."""
        net.share_with(self.net)

    def add_callback(self, on_start, on_gradients_ready=None) -> None:
        """Called at the start of each iteration and when its gradients are ready; or, as
        pycaffe's ``add_callback(nccl)``, the NCCL joined to this solver (whose gradients the
        solver then sums over the ranks by itself)."""
        if isinstance(on_start, NCCL) and on_gradients_ready is None:
            return
        self._solver.start_hooks.append(on_start)
        self._solver.gradient_hooks.append(on_gradients_ready)


class NCCL:
    """pycaffe's NCCL: ``NCCL(solver, uid)`` in each process (caffe.set_solver_count(n) and
    set_solver_rank(r) before the solver was made) joins the solvers of the processes given
    the same ``uid`` (``NCCL.new_uid()``, made before they start) over torch.distributed: NCCL
    between GPUs, gloo between CPUs. From then on the solvers train as ``caffe-alex train
    --gpu`` ranks do (docs/distributed.md): the gradients summed over the ranks and scaled by
    1/ranks before each update (layer by layer while the backward pass runs when the solver's
    layer_wise_reduce is true), requests agreed, rank 0 alone testing and snapshotting.
    ``bcast()`` gives every rank rank 0's weights. ``solver.add_callback(nccl)`` and
    ``solver.net.after_backward(nccl)``, which pycaffe's scripts call, are accepted: the solver
    does the exchange itself."""

    def __init__(self, solver: Solver, uid: bytes):
        count, rank = runtime.solver_count(), runtime.solver_rank()
        if count < 2:
            raise CaffeAlexError(
                "caffe.NCCL joins the solvers of several processes: call "
                "caffe.set_solver_count(n) and caffe.set_solver_rank(r) before making the solver"
            )
        core = solver._solver
        ranks = distributed.Ranks(rank, count, rank, count)
        uid = uid.decode() if isinstance(uid, bytes) else str(uid)
        self.world = distributed.World.start(ranks, core.device, init_method=uid)
        core.join(self.world)
        self._solver = core
        # Every rank has met, and a first collective on the device has set up its links (NCCL
        # makes its communicator through the rendezvous too): rank 0 removes the file.
        self.world.broadcast_tensors([torch.zeros(1, device=core.device)])
        self.world.all_gather(None)
        if rank == 0 and uid.startswith("file://"):
            with contextlib.suppress(OSError):
                os.remove(uid[len("file://") :])

    @staticmethod
    def new_uid() -> bytes:
        """Where the processes meet: a file every one of them can reach (this machine)."""
        name = f"caffe-alex-nccl-{os.getpid()}-{secrets.token_hex(8)}"
        return f"file://{os.path.join(tempfile.gettempdir(), name)}".encode()

    def bcast(self) -> None:
        """Rank 0's parameters on every rank (Caffe's NCCL::Broadcast)."""
        self.world.broadcast_tensors([info.param for info in self._solver.learnable])

    def __call__(self, *args) -> None:
        """net.after_backward's per-layer call: the sums already start as gradients are ready."""


def _solver_class(type_name: str) -> type[Solver]:
    return type(f"{type_name}Solver", (Solver,), {"solver_type": type_name,
                "__doc__": f"pycaffe's {type_name}Solver."})  # fmt: skip


SGDSolver = _solver_class("SGD")
NesterovSolver = _solver_class("Nesterov")
AdaGradSolver = _solver_class("AdaGrad")
RMSPropSolver = _solver_class("RMSProp")
AdaDeltaSolver = _solver_class("AdaDelta")
AdamSolver = _solver_class("Adam")
_BY_TYPE = {cls.solver_type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver,
            RMSPropSolver, AdaDeltaSolver, AdamSolver)}  # fmt: skip


def get_solver(filename) -> Solver:
    """The solver of ``filename``'s type (Caffe's SolverRegistry::CreateSolver)."""
    param = read_solver(os.fspath(filename))
    return _BY_TYPE.get(param.type, Solver)(filename)
