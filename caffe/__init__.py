"""``import caffe``: caffe-alex's pycaffe, so existing pycaffe code runs on PyTorch.

A thin package: everything lives in caffe_alex.pycaffe (and the modules below re-export it
under pycaffe's module names). A real pycaffe earlier on sys.path still wins, as Python's
import order gives it.
"""

from caffe_alex.pycaffe import *  # noqa: F403
from caffe_alex.pycaffe import __all__ as _core_names
from caffe_alex.pycaffe import __version__  # noqa: F401

from . import io  # noqa: F401  (caffe.io, as pycaffe imports it)
from .classifier import Classifier
from .detector import Detector
from .net_spec import NetSpec, layers, params, to_proto
from .proto import caffe_pb2 as _caffe_pb2  # noqa: F401  (binds caffe.proto.caffe_pb2, as pycaffe)

__all__ = [*_core_names, "Classifier", "Detector", "NetSpec", "io", "layers", "params",
           "to_proto"]  # fmt: skip
