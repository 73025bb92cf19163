"""What pycaffe code reads of a ``caffe.Net``: its blobs and learnable blobs as ordered dicts,
its layers (``LayerView``) and their names, each layer's tops and bottoms, the net's inputs and
outputs and the blobs' loss weights. Views over the net's plan and its executor's persistent
blobs: nothing is copied."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from ..blob import Blob, ParamBlob
from ..net import Net as Module

if TYPE_CHECKING:
    from .net import Net


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


class NetViews:
    """The views of pycaffe's Net (net.py), over its ``_module`` (the plan), ``_steps`` and
    ``_blobs`` (its executor's) and ``layers``."""

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
