"""The update rules by Caffe's solver type name (``type: "Adam"``), one module each."""

from __future__ import annotations

from .adadelta import AdaDelta
from .adagrad import AdaGrad
from .adam import Adam
from .rmsprop import RMSProp
from .sgd import SGD, Nesterov, UpdateRule

RULES: dict[str, type[UpdateRule]] = {
    cls.type_name: cls for cls in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)
}
