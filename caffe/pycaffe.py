"""caffe.pycaffe: where pycaffe defines Net and the solvers (the same objects as caffe.*)."""

from caffe_alex.pycaffe import (  # noqa: F401
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    Net,
    RMSPropSolver,
    SGDSolver,
)
