"""caffe-alex: BVLC Caffe's nets and solvers on PyTorch, with Caffe's numbers.

The entry points, importable from here (each loads its module on first use, so that
``import caffe_alex`` and the command line start quickly):

- ``Net``: a net definition built for one phase, a ``torch.nn.Module``
  (``Net.from_prototxt(path, phase)``; ``net.load_weights`` / ``net.save_weights``).
- ``Solver``: Caffe's training loop from a solver file (``Solver.from_file(path).solve()``).
- ``read_weights`` / ``load_weights`` / ``save_weights``: weights files of every format
  (.caffemodel, .caffemodel.h5, .pt, .safetensors) read, copied into a net, written.
- ``make_feed``: batches for a net's data layers (LMDB/LevelDB, image lists, HDF5, arrays).
- ``summarize``: per-layer shapes, parameters and multiply-adds of a built net.
- ``draw_net_to_file``: the net diagram of Caffe's draw_net.py.
- ``Classifier``: pycaffe's caffe.Classifier (images in, class scores out).
- ``CaffeAlexError``: every error caffe-alex reports (file, line, layer and what is wrong).
- ``layer_types`` / ``register``: the layer catalogue, and adding a layer type to it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# PyTorch's OpenMP threads spin at each barrier for 300,000 turns by default (libgomp): on a
# machine whose cores other processes also use, a spinning thread holds the core that the
# thread it waits for needs, and AlexNet's forward at batch 1 took 340-880 ms instead of 60-140
# (docs/benchmarks.md). Waiting passively at once costs an idle machine a wake-up per parallel
# region (GoogLeNet at batch 1: 50-68 ms instead of 36-40); 10,000 turns keeps the idle speed
# and most of the gain under load. libgomp reads this when torch loads, so it is set here,
# before any torch import, unless the user chose a spin count or a wait policy.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "10000"

# Large tensors freed and allocated again every iteration are reused instead of mapped afresh
# (memory.py: AlexNet's CPU iteration 1.40 -> 1.19 s); CAFFE_ALEX_MALLOC=system turns it off.
from .memory import keep_freed_memory  # noqa: E402

KEEPS_FREED_MEMORY = keep_freed_memory()

# public name -> module that defines it
_EXPORTS = {
    "CaffeAlexError": "caffe_alex.errors",
    "Net": "caffe_alex.net",
    "Solver": "caffe_alex.solvers.solver",
    "read_weights": "caffe_alex.formats.weights",
    "load_weights": "caffe_alex.formats.weights",
    "save_weights": "caffe_alex.formats.weights",
    "make_feed": "caffe_alex.data.loader",
    "summarize": "caffe_alex.tools.summary",
    "draw_net_to_file": "caffe_alex.tools.draw",
    "Classifier": "caffe_alex.tools.deploy",
    "layer_types": "caffe_alex.layers",
    "register": "caffe_alex.registry",
}
__all__ = [
    "CaffeAlexError", "Net", "Solver", "read_weights", "load_weights", "save_weights",
    "make_feed", "summarize", "draw_net_to_file", "Classifier", "layer_types", "register",
]  # fmt: skip


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'caffe_alex' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .data.loader import make_feed
    from .errors import CaffeAlexError
    from .formats.weights import load_weights, read_weights, save_weights
    from .layers import layer_types
    from .net import Net
    from .registry import register
    from .solvers.solver import Solver
    from .tools.deploy import Classifier
    from .tools.draw import draw_net_to_file
    from .tools.summary import summarize
