"""pycaffe's ``caffe.Net``: a net you drive from Python the way Caffe's is driven.

The net is caffe_alex's plan (``caffe_alex.Net``, built with Caffe's implicit Split layers, so
names, indices and saved files are Caffe's) run by layerwise.py's BlobExecutor, Caffe's own
execution model: every blob is a persistent ``Blob`` whose ``data`` and ``diff`` Python reads
and writes; ``forward`` runs the layers from ``start`` to ``end`` over those blobs (a data layer
in the range pulls its next batch, an ``Input`` layer keeps what was written into it);
``backward`` runs them back, each layer from the data and diffs its blobs hold at that moment
(a loss top's diff starts as its loss weight, as Caffe sets it), so it needs no forward just
before it; parameter diffs accumulate until ``clear_param_diffs``.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from ..blob import Blob
from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..formats.prototxt import read_net
from ..formats.weights import save_weights
from ..layerwise import BlobExecutor
from ..net import Net as Module
from ..solvers.nets import share_trained_layers
from . import batching, runtime
from .net_views import LayerView, NetViews

PHASES = {0: "TRAIN", 1: "TEST"}


def phase_name(phase) -> str:
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return phase.upper()
    if phase in PHASES:
        return PHASES[phase]
    raise CaffeAlexError(f"phase must be caffe.TRAIN (0) or caffe.TEST (1), got {phase!r}")


class Net(NetViews):
    """``Net(network_file, phase, level=0, stages=None, weights=None)`` or the older
    ``Net(network_file, weights, phase)``. What pycaffe code reads of it (blobs, params,
    layer names, inputs, outputs) is net_views.py's; forward_all and forward_backward_all run
    it in batches (batching.py)."""

    def __init__(self, network_file, *args, phase=None, level=0, stages=None, weights=None):
        if args and isinstance(args[0], (str, os.PathLike)):  # (file, weights, phase)
            weights, args = args[0], args[1:]
        if args:
            phase = args[0]
        if len(args) > 1:
            raise TypeError("Net(network_file, phase, level=0, stages=None, weights=None)")
        if phase is None:
            raise TypeError("Net() needs a phase: caffe.TRAIN or caffe.TEST")
        net_param, source = read_net(os.fspath(network_file))
        module = Module(net_param, phase_name(phase), level=level, stages=list(stages or ()),
                        source=source, insert_splits=True).to(runtime.device())  # fmt: skip
        self._feed = None
        self._attach(BlobExecutor(module, runtime.device(), source=self._next_batch))
        if weights is not None:
            self.copy_from(weights)

    @classmethod
    def wrap(cls, executor: BlobExecutor) -> Net:
        """A pycaffe view of an executor made elsewhere (a solver's, which draws its batches
        from the solver's feed)."""
        net = cls.__new__(cls)
        net._feed = None
        net._attach(executor)
        return net

    def _attach(self, executor: BlobExecutor) -> None:
        self._executor = executor
        self._module = executor.net
        self._steps = list(executor.steps)
        self._blobs: OrderedDict[str, Blob] = executor.blobs
        self.layers = [LayerView(self, i) for i in range(len(self._steps))]

    # -- callbacks -------------------------------------------------------------------------
    def before_forward(self, callback) -> None:
        self._executor.hooks["before_forward"].append(callback)

    def after_forward(self, callback) -> None:
        self._executor.hooks["after_forward"].append(callback)

    def before_backward(self, callback) -> None:
        self._executor.hooks["before_backward"].append(callback)

    def after_backward(self, callback) -> None:
        self._executor.hooks["after_backward"].append(callback)

    # -- forward ---------------------------------------------------------------------------
    def _index(self, name, default: int) -> int:
        if name is None:
            return default
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise CaffeAlexError(f"no layer named '{name}' in the net") from None

    def forward(self, blobs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Set inputs from ``kwargs``, run layers ``start``..``end`` (names, inclusive) and
        return the output blobs (or ``end``'s tops) plus ``blobs``, as arrays."""
        blobs = list(blobs or [])
        start_ind = self._index(start, 0)
        end_ind = self._index(end, len(self.layers) - 1)
        outputs = set((self.top_names[end] if end is not None else self.outputs) + blobs)
        self._write(kwargs, self.inputs, "data", "Input blob arguments do not match net "
                    "inputs.", "Input is not batch sized")  # fmt: skip
        self._forward(start_ind, end_ind)
        return {name: self._blobs[name].data for name in outputs}

    def _write(self, arrays: dict, names: list[str], kind: str, mismatch: str, size: str):
        """Arrays given by name into the blobs' ``data`` or ``diff`` (pycaffe's messages)."""
        if not arrays:
            return
        if set(arrays) != set(names):
            raise CaffeAlexError(mismatch)
        for name, value in arrays.items():
            if np.shape(value)[0] != self._blobs[name].shape[0]:
                raise CaffeAlexError(size)
            getattr(self._blobs[name], kind)[...] = value

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ForwardFromTo: layers ``start``..``end`` (indices); returns their loss."""
        self._follow_mode()
        loss = self._executor.forward(start, end)
        return float(loss) if loss is not None else 0.0

    def _next_batch(self):
        if self._feed is None:
            self._feed = make_feed(self._module, seed=runtime.seed())
        return next(self._feed)

    # -- backward --------------------------------------------------------------------------
    def backward(self, diffs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Set output diffs from ``kwargs``, run layers ``start``..``end`` backward (from the
        last layer to the first by default) and return the input diffs plus ``diffs``."""
        diffs = list(diffs or [])
        start_ind = self._index(start, len(self.layers) - 1)
        end_ind = self._index(end, 0)
        outputs = set((self.bottom_names[end] if end is not None else self.inputs) + diffs)
        self._write(kwargs, self.outputs, "diff", "Top diff arguments do not match net "
                    "outputs.", "Diff is not batch sized")  # fmt: skip
        self._backward(start_ind, end_ind)
        return {name: self._blobs[name].diff for name in outputs}

    def _backward(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo: layers ``start`` down to ``end`` (indices)."""
        self._follow_mode()
        self._executor.backward(start, end)

    # -- inputs of any length (batching.py) -----------------------------------------------
    def forward_all(self, blobs=None, **kwargs) -> dict[str, np.ndarray]:
        """forward() over inputs of any length, in batches; outputs concatenated."""
        return batching.forward_all(self, blobs, kwargs)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """forward() and backward() over inputs (and output diffs) of any length."""
        return batching.forward_backward_all(self, blobs, diffs, kwargs)

    # -- shapes, weights, state --------------------------------------------------------------
    def reshape(self) -> None:
        """Caffe's Net::Reshape: new top shapes from the input blobs' current shapes."""
        inputs = {n: self._blobs[n].shape for n in self._module.input_names}
        self._module.reshape(**inputs)
        for name, shape in self._module.blob_shapes.items():
            if name in self._blobs and self._blobs[name].shape != tuple(shape):
                self._blobs[name].reshape(*shape)

    def copy_from(self, weights) -> None:
        self._module.load_weights(os.fspath(weights))

    load_hdf5 = copy_from  # the weights reader tells HDF5 files by their content

    def share_with(self, other: Net) -> None:
        """Caffe's ShareTrainedLayersWith: layers named alike use ``other``'s blobs."""
        share_trained_layers(self._module, other._module)

    def save(self, filename) -> None:
        save_weights(self._module, os.fspath(filename), kind="caffemodel")

    def save_hdf5(self, filename) -> None:
        save_weights(self._module, os.fspath(filename), kind="h5")

    def clear_param_diffs(self) -> None:
        self._executor.clear_param_diffs()

    def set_input_arrays(self, data, labels) -> None:
        """Arrays for the MemoryData layer, which must be the first layer (as pycaffe)."""
        if not self._module.layer_types or self._module.layer_types[0] != "MemoryData":
            raise CaffeAlexError(
                "set_input_arrays may only be called if the first layer is a MemoryDataLayer"
            )
        if not isinstance(data, np.ndarray) or data.dtype != np.float32:
            raise CaffeAlexError("data array must be float32")
        if not data.flags.c_contiguous:
            raise CaffeAlexError("data array must be C contiguous")
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[:, None, None, None]
        if len(labels) != len(data):
            raise CaffeAlexError("data and labels must have the same first dimension")
        try:
            self._module.set_input_arrays(data, labels.reshape(len(labels)))
        except ValueError as exc:
            raise CaffeAlexError(str(exc)) from None
        self._feed = None  # the next forward serves the new arrays from their first row

    def _follow_mode(self) -> None:
        """Caffe's mode is global: follow set_mode_cpu/gpu made after the net was built."""
        self._executor.follow(runtime.device())
