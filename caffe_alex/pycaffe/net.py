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

from ..blob import Blob, ParamBlob
from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..formats.prototxt import read_net
from ..formats.weights import save_weights
from ..layerwise import BlobExecutor
from ..net import Net as Module
from ..solvers.nets import share_trained_layers
from . import runtime

PHASES = {0: "TRAIN", 1: "TEST"}


def phase_name(phase) -> str:
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return phase.upper()
    if phase in PHASES:
        return PHASES[phase]
    raise CaffeAlexError(f"phase must be caffe.TRAIN (0) or caffe.TEST (1), got {phase!r}")


class LayerView:
    """One entry of ``net.layers``: ``type``, ``blobs`` (its learnable blobs), ``setup`` and
    ``reshape`` (recompute the top shapes from the bottoms')."""

    def __init__(self, net: Net, index: int):
        self._net, self._index = net, index
        self.type = net._module.layer_types[index]
        self.blobs: list[ParamBlob] = net._executor.param_blobs[index]

    def reshape(self, bottom, top) -> None:
        step = self._net._steps[self._index]
        shapes = self._net._module.layers[step.key].top_shapes([b.shape for b in bottom])
        for blob, shape in zip(top, shapes):
            blob.reshape(*shape)

    setup = reshape  # the layer was set up when the net was built

    def __getattr__(self, name: str):
        # pycaffe's net.layers holds a Python layer's own object: its methods and attributes
        # are reachable (py-faster-rcnn's trainer calls net.layers[0].set_roidb(roidb))
        net = self.__dict__.get("_net")
        if net is None or name.startswith("__"):
            raise AttributeError(name)
        impl = getattr(net._module.layers[net._steps[self._index].key], "impl", None)
        if impl is None:
            raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")
        return getattr(impl, name)

    def __repr__(self) -> str:
        return f"<Layer {self._net._layer_names[self._index]!r} ({self.type})>"


class Net:
    """``Net(network_file, phase, level=0, stages=None, weights=None)`` or the older
    ``Net(network_file, weights, phase)``."""

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

    # -- what pycaffe code reads ---------------------------------------------------------
    @property
    def blobs(self) -> OrderedDict[str, Blob]:
        return self._blobs

    @property
    def params(self) -> OrderedDict[str, list[ParamBlob]]:
        return OrderedDict(
            (name, layer.blobs) for name, layer in zip(self._layer_names, self.layers)
            if layer.blobs
        )  # fmt: skip

    @property
    def layer_dict(self) -> OrderedDict:
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def _layer_names(self) -> list[str]:
        return list(self._module.layer_names)

    @property
    def _blob_names(self) -> list[str]:
        return list(self._blobs)

    @property
    def inputs(self) -> list[str]:
        """Tops of Input layers (Caffe's net inputs)."""
        return [t for s, kind in zip(self._steps, self._module.layer_types) if kind == "Input"
                for t in s.tops]  # fmt: skip

    @property
    def outputs(self) -> list[str]:
        return list(self._module.output_names)

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((n, list(s.tops)) for n, s in zip(self._layer_names, self._steps))

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((n, list(s.bottoms)) for n, s in zip(self._layer_names, self._steps))

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        weights = self._module.blob_loss_weights
        return OrderedDict((name, weights.get(name, 0.0)) for name in self._blobs)

    @property
    def module(self) -> Module:
        """The caffe_alex.Net (a torch.nn.Module) underneath."""
        return self._module

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

    # -- batches of many items --------------------------------------------------------------
    def _batch(self, arrays: dict[str, np.ndarray]):
        """Split arrays into the net's batch size; the last batch padded with zeros."""
        count = len(next(iter(arrays.values())))
        size = next(iter(self._blobs.values())).shape[0]
        for begin in range(0, count - count % size, size):
            yield {name: value[begin : begin + size] for name, value in arrays.items()}
        remainder = count % size
        if remainder:
            yield {
                name: np.concatenate([value[-remainder:],
                                      np.zeros((size - remainder, *value.shape[1:]))])
                for name, value in arrays.items()
            }  # fmt: skip

    def forward_all(self, blobs=None, **kwargs) -> dict[str, np.ndarray]:
        """forward() over inputs of any length, in batches; outputs concatenated."""
        collected = {name: [] for name in set(self.outputs + list(blobs or []))}
        for batch in self._batch(kwargs):
            for name, value in self.forward(blobs=blobs, **batch).items():
                collected[name].extend(value.copy())
        result = {name: np.asarray(values) for name, values in collected.items()}
        return self._unpad(result, kwargs)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """forward() and backward() over inputs (and output diffs) of any length."""
        outs = {name: [] for name in set(self.outputs + list(blobs or []))}
        grads = {name: [] for name in set(self.inputs + list(diffs or []))}
        forward = list(self._batch({n: kwargs[n] for n in self.inputs if n in kwargs}))
        backward = list(self._batch({n: kwargs[n] for n in self.outputs if n in kwargs}))
        for i in range(max(len(forward), len(backward))):
            got = self.forward(blobs=blobs, **(forward[i] if i < len(forward) else {}))
            back = self.backward(diffs=diffs, **(backward[i] if i < len(backward) else {}))
            for name, value in got.items():
                outs[name].extend(value.copy())
            for name, value in back.items():
                grads[name].extend(value.copy())
        outs = {name: np.asarray(values) for name, values in outs.items()}
        grads = {name: np.asarray(values) for name, values in grads.items()}
        return self._unpad(outs, kwargs), self._unpad(grads, kwargs)

    @staticmethod
    def _unpad(result: dict, given: dict) -> dict:
        if not result or not given:
            return result
        pad = len(next(iter(result.values()))) - len(next(iter(given.values())))
        return {name: value[:-pad] for name, value in result.items()} if pad > 0 else result

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
