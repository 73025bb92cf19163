"""Caffe's solvers: the update rules (one module each), lr policies, snapshots and Solver."""

from __future__ import annotations

from .adadelta import AdaDelta
from .adagrad import AdaGrad
from .adam import Adam
from .rmsprop import RMSProp
from .sgd import SGD, Nesterov, UpdateRule

RULES: dict[str, type[UpdateRule]] = {
    cls.type_name: cls for cls in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)
}


def __getattr__(name):  # Solver imports the net builder; load it on first use
    if name == "Solver":
        from .solver import Solver

        return Solver
    raise AttributeError(name)


__all__ = ["RULES", "Solver", "UpdateRule", "SGD", "Nesterov", "AdaGrad", "RMSProp",
           "AdaDelta", "Adam"]  # fmt: skip
