"""pycaffe's solvers: ``caffe.SGDSolver(filename)`` and its siblings, ``caffe.get_solver``.

Each runs caffe_alex's Solver (Caffe's training loop and update rules) with Caffe's Split
layers in its nets; ``solver.net`` and ``solver.test_nets`` are pycaffe Nets over the same
modules and the same data feeds, so ``solver.net.forward()`` draws the batch the next step
would have drawn, as Caffe's shared data layer does, and after ``step`` their blobs hold the
last iteration's values.
"""

from __future__ import annotations

import os

from ..formats.prototxt import read_solver
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
        self._solver = CoreSolver(param, source_path=filename, device=runtime.device(),
                                  seed=seed, insert_splits=True)  # fmt: skip
        core = self._solver
        self.net = Net.wrap(core.train_net, feed=core.feed("train"))
        self.test_nets = [Net.wrap(n, feed=core.feed(i)) for i, n in enumerate(core.test_nets)]
        # the train net's blobs show each iteration's forward by the time callbacks run
        core.gradient_hooks.append(self.net.sync_from_module)

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
        self._sync()

    def solve(self, resume=None) -> None:
        self._solver.solve(os.fspath(resume) if resume is not None else None)
        self._sync()

    def snapshot(self) -> None:
        self._solver.snapshot()

    def restore(self, state_file) -> None:
        self._solver.restore(os.fspath(state_file))

    def apply_update(self) -> None:
        self._solver.apply_update()

    def share_weights(self, net: Net) -> None:
        """Let ``net`` use this solver's trained blobs (layers named alike)."""
        net.share_with(self.net)

    def add_callback(self, on_start, on_gradients_ready) -> None:
        """Called at the start of each iteration and when its gradients are ready."""
        self._solver.start_hooks.append(on_start)
        self._solver.gradient_hooks.append(on_gradients_ready)

    def _sync(self) -> None:
        self.net.sync_from_module()
        for net in self.test_nets:
            net.sync_from_module()


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
