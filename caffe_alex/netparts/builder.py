"""Caffe's Net::Init: the layers a phase includes, each looked up in the registry, checked,
built and wired in prototxt order into a Net's lists and its plan (the LayerSteps).

Wiring: a bottom is the latest blob of that name (so an in-place layer rebinds the name); a top
may reuse a name only in place. Nothing here names a layer type.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from torch import nn

from ..errors import CaffeAlexError, LayerConfigError, SourceMap, one_line
from ..formats.filtering import filter_net, included_indices
from ..formats.splits import insert_splits as with_splits
from ..proto import caffe_pb2
from ..registry import CaffeLayer, Shape, get_layer_class
from . import checks
from .params import load_embedded_blobs, register_params
from .plan import LayerStep, ParamInfo
from .shapes import checked_tops


def filtered_for(
    net_param: caffe_pb2.NetParameter, state, insert_splits: bool, source: SourceMap
) -> tuple[caffe_pb2.NetParameter, list[int]]:
    """The layers ``state`` includes (with Caffe's Split layers when asked) and, for each, its
    position in ``net_param`` (for the line of an error)."""
    try:
        filtered = filter_net(net_param, state)
        origin = included_indices(net_param, state)
    except ValueError as exc:
        raise CaffeAlexError(str(exc), file=source.path) from None
    if insert_splits:  # Caffe's own layer list (pycaffe shows it); a Split maps to its writer
        filtered, positions = with_splits(filtered)
        origin = [origin[p] for p in positions]
    return filtered, origin


class PlanBuilder:
    """Builds ``net`` (a Net with empty lists) layer by layer: its layers, names, types,
    inputs, outputs, blob shapes and ParamInfos; ``build`` returns the steps. ``overrides``:
    declared shapes of source tops."""

    def __init__(self, net, overrides: Mapping[str, Shape]):
        self.net = net
        self.overrides = overrides
        self.steps: list[LayerStep] = []
        self.producers: dict[str, str] = {}  # blob name -> layer that last wrote it
        self.available: list[str] = []  # blobs no layer has read yet: the net's outputs
        self.shares: dict[str, ParamInfo] = {}  # ParamSpec name -> the blob's owner
        self.anonymous: set[str] = set()  # automatic tops of loss layers: no layer reads them

    def build(self, net_param: caffe_pb2.NetParameter) -> list[LayerStep]:
        for layer_param in net_param.layer:
            self.add_layer(layer_param)
        allow_in_place(self.steps, self.net.layers)
        self.net.output_names = sorted(self.available)  # Caffe keeps net outputs in a std::set
        return self.steps

    def add_layer(self, lp: caffe_pb2.LayerParameter) -> None:
        # an error located at the layer being built, also after _record has counted it
        fail = functools.partial(self.net._fail, lp, position=len(self.net.layer_names))
        try:
            cls = get_layer_class(lp.type)
        except LayerConfigError as exc:
            raise fail(str(exc)) from None
        lp, anonymous = self._with_automatic_tops(lp, cls)
        checks.check_counts(lp, cls, fail)
        checks.check_fields(lp, cls, fail)
        detach = checks.detach_flags(lp, fail)
        loss_weights = checks.loss_weights(lp, cls, anonymous, fail)
        checks.check_bottoms(lp, self.net.blob_shapes, self.anonymous, fail)
        checks.check_tops(lp, self.net.blob_shapes, self.producers, anonymous, fail)
        layer, top_shapes = self._construct(lp, cls, fail)
        self.anonymous.update(anonymous)
        key = self._record(lp, cls, layer, top_shapes, anonymous)
        load_embedded_blobs(lp, layer, fail)
        self.net.param_infos.extend(register_params(lp, layer, self.shares, fail))
        step = LayerStep(lp.name, key, list(lp.bottom), list(lp.top), detach, loss_weights)
        self.steps.append(step)

    def _with_automatic_tops(self, lp, cls) -> tuple[caffe_pb2.LayerParameter, set[str]]:
        # Caffe gives a loss layer declared without a top an anonymous one: its loss still
        # counts, but it is not a net output and no layer can read it. Two such layers may
        # share a name, so a repeated name gets a number.
        missing = cls.tops[0] - len(lp.top)
        if not cls.is_loss or missing <= 0:
            return lp, set()
        completed = caffe_pb2.LayerParameter()
        completed.CopyFrom(lp)
        names = []
        for i in range(len(lp.top), len(lp.top) + missing):
            name, n = f"({lp.name} automatic top {i})", 1
            while name in self.net.blob_shapes:
                n += 1
                name = f"({lp.name} automatic top {i}, {n})"
            names.append(name)
        completed.top.extend(names)
        return completed, set(names)

    def _construct(self, lp, cls, fail: checks.Fail) -> tuple[CaffeLayer, list[Shape]]:
        """The layer built from its declaration and bottom shapes, and its top shapes."""
        bottom_shapes = [self.net.blob_shapes[b] for b in lp.bottom]
        # Caffe's Net::Init gives a layer the net's phase only where its own is unset.
        phase = caffe_pb2.Phase.Name(lp.phase) if lp.HasField("phase") else self.net.phase
        try:
            layer = cls(lp, bottom_shapes, phase)
            top_shapes = self._infer_top_shapes(layer, lp, bottom_shapes)
        except LayerConfigError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:  # a user's code (a Python layer) raised: it goes on as it is,
            error = one_line(exc)  # its one line told where in the file
            if error is not None and error is not exc:
                error.file, error.line = self.net.source.path, fail("").line
            raise
        if len(lp.param) > len(layer.blobs):  # Caffe: "Too many params specified"
            raise fail(
                f"{len(lp.param)} param specs given for {len(layer.blobs)} learnable blob(s)"
            )
        return layer, top_shapes

    def _infer_top_shapes(self, layer: CaffeLayer, lp, bottom_shapes) -> list[Shape]:
        if layer.is_source and lp.top and all(t in self.overrides for t in lp.top):
            return checked_tops(lp.top, [self.overrides[t] for t in lp.top])
        shapes = [tuple(s) for s in layer.top_shapes(bottom_shapes)]
        if layer.is_source:
            shapes = [self.overrides.get(t, s) for t, s in zip(lp.top, shapes)]
        if len(shapes) < len(lp.top):
            raise LayerConfigError(f"produces {len(shapes)} tops but {len(lp.top)} are named")
        return checked_tops(lp.top, shapes)

    def _record(self, lp, cls, layer: CaffeLayer, top_shapes, anonymous) -> str:
        """Add the built layer to the net's lists and its tops to the wiring; its module key."""
        net = self.net
        key = module_key(net.layers, lp.name)
        net.layers[key] = layer
        net.layer_names.append(lp.name)
        net.layer_types.append(lp.type)
        if cls.is_source:
            net.input_names.extend(lp.top)
        for bottom in lp.bottom:
            if bottom in self.available:
                self.available.remove(bottom)
        for top, shape in zip(lp.top, top_shapes):
            net.blob_shapes[top] = shape
            self.producers[top] = lp.name
            if top not in anonymous and top not in self.available:  # a top repeated in place
                self.available.append(top)
        return key


def module_key(layers: nn.ModuleDict, name: str) -> str:
    # nn.Module names may not contain '.' (Caffe layer names often do) nor shadow a method
    # of nn.ModuleDict (a layer called "half" or "train").
    base = name.replace(".", "_") or "_"
    key, n = base, 1
    while key in layers or hasattr(layers, key):
        n += 1
        key = f"{base}_{n}"
    return key


def allow_in_place(steps: list[LayerStep], layers: nn.ModuleDict) -> None:
    """Let a layer declared in place overwrite its bottom where nothing else needs the old
    values: the bottom's producer does not read its own output in backward, and no other
    layer read the blob between the producer and this layer."""
    writer: dict[str, CaffeLayer] = {}  # blob -> layer that wrote the current version
    readers: dict[str, int] = {}  # blob -> layers that read it since
    written: dict[str, tuple[LayerStep, int]] = {}  # blob -> (its writer's step, top index)
    for step in steps:
        layer = layers[step.key]
        blob = step.bottoms[0] if step.bottoms else None
        producer = writer.get(blob)
        layer.in_place = (
            layer.can_overwrite_bottom
            and bool(step.tops)
            and step.tops[0] == blob
            and producer is not None
            and not producer.output_needed_by_backward
            and readers.get(blob, 0) == 0
        )
        if layer.in_place:
            earlier, index = written[blob]
            earlier.overwritten.add(index)
        for bottom in step.bottoms:
            readers[bottom] = readers.get(bottom, 0) + 1
        for index, top in enumerate(step.tops):
            writer[top], readers[top], written[top] = layer, 0, (step, index)
