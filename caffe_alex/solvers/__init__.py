"""Caffe's solvers: the update rules (one module each, by type name in rules.py), lr policies,
snapshots, and Solver (solver.py), which runs Caffe's training loop over them."""

from __future__ import annotations

from .adadelta import AdaDelta
from .adagrad import AdaGrad
from .adam import Adam
from .rmsprop import RMSProp
from .rules import RULES
from .sgd import SGD, Nesterov, UpdateRule
from .solver import Solver

__all__ = ["RULES", "Solver", "UpdateRule", "SGD", "Nesterov", "AdaGrad", "RMSProp",
           "AdaDelta", "Adam"]  # fmt: skip
