"""caffe-alex: BVLC Caffe's nets and solvers on PyTorch, with Caffe's numbers."""

from .errors import CaffeAlexError
from .net import Net
from .registry import layer_types, register

__all__ = ["CaffeAlexError", "Net", "layer_types", "register"]
__version__ = "0.1.0"
