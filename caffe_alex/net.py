"""The generic net builder and Caffe's forward loop. Nothing here names a layer type.

Wiring follows Caffe's Net::Init: layers run in prototxt order; a bottom is the latest blob of
that name (so an in-place layer rebinds the name); a top may reuse a name only in place. A blob
read by several layers needs no Split: autograd sums the gradients, as Caffe's implicit Split
layers do. The net loss is the sum over tops of ``loss_weight * sum(top)``.

Every shape the builder infers (each top, at build and at ``reshape``) and every learnable
blob's shape (before it is filled) is held to Caffe's Blob::Reshape limits: no negative
dimension, at most INT_MAX elements, at most 32 axes.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import layers  # noqa: F401  (importing the package registers the built-in layer types)
from .errors import CaffeAlexError, LayerConfigError, SourceMap, one_line
from .fillers import check_blob_shape
from .formats.blobs import blob_proto_to_array
from .formats.filtering import filter_net, included_indices, make_state
from .formats.prototxt import read_net
from .formats.splits import insert_splits as with_splits
from .formats.weights import LoadReport, load_weights, save_weights
from .proto import caffe_pb2
from .registry import CaffeLayer, Shape, exporting, get_layer_class

# Fields of a *_param message that mean "which implementation", not "what": always accepted.
_IMPLEMENTATION_FIELDS = frozenset({"engine"})
# A net whose every blob and learnable blob is under this many elements runs on one thread
# (thread_policy "auto"): its ops are too short for a second thread to pay for its wake-up, and
# some of PyTorch's kernels (softmax, log_softmax and their backward over the last axis) start
# the pool for any input, even 10 x 2, which costs milliseconds on a busy machine. PyTorch's
# own element-wise kernels split work only above this size (at::internal::GRAIN_SIZE).
ONE_THREAD_ELEMENTS = 32768
THREAD_POLICIES = ("auto", "pool", "one")


@dataclass
class ParamInfo:
    """One learnable blob as the solver sees it (Caffe's learnable_params_ entry)."""

    layer: str
    index: int
    param: nn.Parameter
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    share_name: str = ""
    owner: tuple[str, int] | None = None  # (layer, index) this blob is shared from
    given: set[str] = field(default_factory=set)  # which multipliers the prototxt set


@dataclass
class LayerStep:
    """One layer of the forward loop, as wired: the blobs it reads and writes, which bottoms
    get no gradient (propagate_down), and the loss weight of each top that has one."""

    layer: str
    key: str
    bottoms: list[str]
    tops: list[str]
    detach: list[bool]
    loss_weights: list[tuple[int, float]] = field(default_factory=list)
    overwritten: set[int] = field(default_factory=set)  # tops a later layer overwrites in place


class Net(nn.Module):
    """A Caffe net for one phase, as a ``torch.nn.Module``.

    ``net(data)`` or ``net(data=..., label=...)`` runs the layers in Caffe's order and returns
    the net's output blobs (those no later layer reads) by name; ``net.loss`` then holds the
    weighted loss (None when no top has a loss weight), ``net.blobs`` every blob by name.
    Parameters are in ``net.params[layer_name]`` in Caffe's blob order and layout.
    ``insert_splits=True`` adds Caffe's implicit Split layers (as Caffe's Net::Init does), for
    code that expects Caffe's exact layer and blob lists (the pycaffe layer).

    ``thread_policy``: "auto" (default) runs a small net (every blob and parameter under
    ONE_THREAD_ELEMENTS) on one thread, "one" always, "pool" never limits PyTorch's threads;
    forward applies it, and ``with net.threads():`` applies it to a backward pass or a whole
    training iteration (the Solver does).
    """

    thread_policy = "auto"

    def __init__(
        self,
        net_param: caffe_pb2.NetParameter,
        phase: str = "TEST",
        *,
        level: int = 0,
        stages: Iterable[str] = (),
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        source: SourceMap | None = None,
        insert_splits: bool = False,
    ):
        super().__init__()
        self.source = source or SourceMap()
        self.phase = phase.upper()
        state = make_state(self.phase, level, stages)
        try:
            filtered = filter_net(net_param, state)
            self._origin = included_indices(net_param, state)  # positions in the source
        except ValueError as exc:
            raise CaffeAlexError(str(exc), file=self.source.path) from None
        if insert_splits:  # Caffe's own layer list (pycaffe shows it); a Split maps to its writer
            filtered, positions = with_splits(filtered)
            self._origin = [self._origin[p] for p in positions]
        self.net_param = filtered
        self.name = filtered.name
        self.layers = nn.ModuleDict()
        self.layer_names: list[str] = []
        self.layer_types: list[str] = []
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.blob_shapes: dict[str, Shape] = {}
        self.param_infos: list[ParamInfo] = []
        self.blobs: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self._steps: list[LayerStep] = []
        self._overrides = {k: _input_dims(k, v) for k, v in (input_shapes or {}).items()}
        self._anonymous: set[str] = set()  # automatic tops of loss layers: no layer reads them
        self._input_shapes: dict[str, Shape] = {}
        self._small: bool | None = None  # every blob under ONE_THREAD_ELEMENTS (None: unknown)
        self._build(filtered)

    @classmethod
    def from_prototxt(cls, path: str, phase: str = "TEST", **kwargs) -> Net:
        """Read (text or binary), upgrade and build a net definition file."""
        net_param, source = read_net(path)
        return cls(net_param, phase, source=source, **kwargs)

    # -- building ---------------------------------------------------------------------
    def _build(self, net_param: caffe_pb2.NetParameter) -> None:
        producers: dict[str, str] = {}  # blob name -> layer that last wrote it
        available: list[str] = []
        shares: dict[str, ParamInfo] = {}
        for layer_param in net_param.layer:
            self._build_layer(layer_param, producers, available, shares)
        self._allow_in_place()
        self.output_names = sorted(available)  # Caffe keeps net outputs in a std::set
        self._input_shapes = {n: self.blob_shapes[n] for n in self.input_names}

    def _fail(self, layer_param, message: str, position: int | None = None) -> CaffeAlexError:
        """An error at the layer being built (or at ``position`` in the filtered net)."""
        position = len(self.layer_names) if position is None else position
        index = self._origin[position] if position < len(self._origin) else None
        return self.source.error(message, layer_param.name, layer_param.type, index)

    def _build_layer(self, lp, producers, available, shares) -> None:
        try:
            cls = get_layer_class(lp.type)
        except LayerConfigError as exc:
            raise self._fail(lp, str(exc)) from None
        lp, anonymous = self._add_automatic_tops(lp, cls)
        self._check_counts(lp, cls)
        self._check_fields(lp, cls)
        detach, loss_weights = self._detach_flags(lp), self._loss_weights(lp, cls, anonymous)
        for index, bottom in enumerate(lp.bottom):
            if bottom not in self.blob_shapes or bottom in self._anonymous:
                raise self._fail(lp, f"unknown bottom blob '{bottom}' (bottom index {index})")
        self._check_tops(lp, producers, anonymous)
        bottom_shapes = [self.blob_shapes[b] for b in lp.bottom]
        # Caffe's Net::Init gives a layer the net's phase only where its own is unset.
        phase = caffe_pb2.Phase.Name(lp.phase) if lp.HasField("phase") else self.phase
        try:
            layer = cls(lp, bottom_shapes, phase)
            top_shapes = self._infer_top_shapes(layer, lp, bottom_shapes)
        except LayerConfigError as exc:
            raise self._fail(lp, str(exc)) from None
        except Exception as exc:  # a user's code (a Python layer) raised: it goes on as it is,
            error = one_line(exc)  # its one line told where in the file
            if error is not None and error is not exc:
                error.file, error.line = self.source.path, self._fail(lp, "").line
            raise
        if len(lp.param) > len(layer.blobs):  # Caffe: "Too many params specified"
            raise self._fail(
                lp,
                f"{len(lp.param)} param specs given for {len(layer.blobs)} learnable blob(s)",
            )
        self._anonymous.update(anonymous)
        key = self._module_key(lp.name)
        self.layers[key] = layer
        self.layer_names.append(lp.name)
        self.layer_types.append(lp.type)
        if cls.is_source:
            self.input_names.extend(lp.top)
        for bottom in lp.bottom:
            if bottom in available:
                available.remove(bottom)
        for top, shape in zip(lp.top, top_shapes):
            self.blob_shapes[top] = shape
            producers[top] = lp.name
            if top not in anonymous and top not in available:  # a top repeated in place
                available.append(top)
        self._load_embedded_blobs(lp, layer)
        self._register_params(lp, layer, shares)
        self._steps.append(
            LayerStep(
                lp.name,
                key,
                list(lp.bottom),
                list(lp.top),
                detach,
                loss_weights,
            )
        )

    def _allow_in_place(self) -> None:
        """Let a layer declared in place overwrite its bottom where nothing else needs the old
        values: the bottom's producer does not read its own output in backward, and no other
        layer read the blob between the producer and this layer."""
        writer: dict[str, CaffeLayer] = {}  # blob -> layer that wrote the current version
        readers: dict[str, int] = {}  # blob -> layers that read it since
        written: dict[str, tuple[LayerStep, int]] = {}  # blob -> (its writer's step, top index)
        for step in self._steps:
            layer = self.layers[step.key]
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

    def _add_automatic_tops(self, lp, cls) -> tuple[caffe_pb2.LayerParameter, set[str]]:
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
            while name in self.blob_shapes:
                n += 1
                name = f"({lp.name} automatic top {i}, {n})"
            names.append(name)
        completed.top.extend(names)
        return completed, set(names)

    def _infer_top_shapes(self, layer: CaffeLayer, lp, bottom_shapes) -> list[Shape]:
        if layer.is_source and lp.top and all(t in self._overrides for t in lp.top):
            return _checked_tops(lp.top, [self._overrides[t] for t in lp.top])
        shapes = [tuple(s) for s in layer.top_shapes(bottom_shapes)]
        if layer.is_source:
            shapes = [self._overrides.get(t, s) for t, s in zip(lp.top, shapes)]
        if len(shapes) < len(lp.top):
            raise LayerConfigError(f"produces {len(shapes)} tops but {len(lp.top)} are named")
        return _checked_tops(lp.top, shapes)

    def _check_counts(self, lp, cls) -> None:
        for what, names, (low, high) in (
            ("bottom", lp.bottom, cls.bottoms),
            ("top", lp.top, cls.tops),
        ):
            n = len(names)
            if n < low or (high is not None and n > high):
                want = (
                    f"{low}" if low == high else f"{low} to {high}" if high else f"at least {low}"
                )
                raise self._fail(lp, f"takes {want} {what} blob(s), got {n}")

    def _check_fields(self, lp, cls) -> None:
        for field_desc, value in lp.ListFields():
            allowed = cls.params.get(field_desc.name, None)
            if field_desc.name not in cls.params or allowed is None:
                continue
            for sub_desc, _ in value.ListFields():
                if sub_desc.name not in allowed and sub_desc.name not in _IMPLEMENTATION_FIELDS:
                    raise self._fail(
                        lp, f"{field_desc.name}.{sub_desc.name} is not supported by this layer"
                    )

    def _check_tops(self, lp, producers, anonymous) -> None:
        # Caffe's AppendTop: a top may name an existing blob only in place (as the bottom at
        # the same index); any other repeat, earlier in the net or among this layer's own
        # tops, is a second producer.
        named_here: set[str] = set()
        for index, top in enumerate(lp.top):
            if top in anonymous or (index < len(lp.bottom) and lp.bottom[index] == top):
                continue
            if top in named_here:
                raise self._fail(
                    lp,
                    f"top blob '{top}' produced by multiple sources (named twice among this "
                    "layer's tops)",
                )
            if top in self.blob_shapes:
                raise self._fail(
                    lp,
                    f"top blob '{top}' produced by multiple sources "
                    f"(already by layer '{producers[top]}')",
                )
            named_here.add(top)

    def _module_key(self, name: str) -> str:
        # nn.Module names may not contain '.' (Caffe layer names often do) nor shadow a method
        # of nn.ModuleDict (a layer called "half" or "train").
        base = name.replace(".", "_") or "_"
        key, n = base, 1
        while key in self.layers or hasattr(self.layers, key):
            n += 1
            key = f"{base}_{n}"
        return key

    def _detach_flags(self, lp) -> list[bool]:
        if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
            raise self._fail(
                lp,
                f"propagate_down must be given once per bottom or not at all "
                f"({len(lp.propagate_down)} for {len(lp.bottom)} bottoms)",
            )
        return [not propagate for propagate in lp.propagate_down] or [False] * len(lp.bottom)

    def _loss_weights(self, lp, cls, anonymous) -> list[tuple[int, float]]:
        weights = list(lp.loss_weight)
        tops = len(lp.top) - len(anonymous)
        if not weights and cls.is_loss:
            if tops > 1:  # Caffe's default is one weight, for top 0: not enough here
                raise self._fail(
                    lp,
                    f"a loss layer with {tops} tops needs loss_weight once per "
                    "top (e.g. loss_weight: 1 loss_weight: 0)",
                )
            weights = [1.0] * len(lp.top)
        if weights and len(weights) != len(lp.top):
            raise self._fail(
                lp,
                f"loss_weight must be given once per top or not at all "
                f"({len(weights)} for {tops} tops)",
            )
        return [(i, w) for i, w in enumerate(weights) if w != 0]

    def _load_embedded_blobs(self, lp, layer: CaffeLayer) -> None:
        # Caffe's Layer constructor copies blobs given inside the LayerParameter.
        if not lp.blobs:
            return
        if len(lp.blobs) != len(layer.blobs):
            raise self._fail(lp, f"has {len(lp.blobs)} embedded blobs, expected {len(layer.blobs)}")
        for index, (proto, param) in enumerate(zip(lp.blobs, layer.blobs)):
            array = self._embedded_array(lp, index, proto)
            if array.size != param.numel():
                raise self._fail(
                    lp,
                    f"embedded blob {index} has shape {list(array.shape)}, "
                    f"expected {list(param.shape)}",
                )
            with torch.no_grad():
                param.copy_(torch.from_numpy(array.reshape(tuple(param.shape))))

    def _embedded_array(self, lp, index: int, proto):
        # Caffe's Blob::FromProto: the shape within Blob::Reshape's limits, then one value per
        # element (double_data when it has any, else data).
        legacy = (proto.num, proto.channels, proto.height, proto.width)
        shape = tuple(proto.shape.dim) if proto.HasField("shape") else legacy
        try:
            shape = check_blob_shape(shape, f"embedded blob {index}")
        except LayerConfigError as exc:
            raise self._fail(lp, str(exc)) from None
        values = len(proto.double_data) or len(proto.data)
        if values != math.prod(shape):
            raise self._fail(
                lp, f"embedded blob {index} holds {values} values for shape {list(shape)}"
            )
        return blob_proto_to_array(proto)

    def _register_params(self, lp, layer: CaffeLayer, shares: dict[str, ParamInfo]) -> None:
        for index, param in enumerate(layer.blobs):
            spec = lp.param[index] if index < len(lp.param) else caffe_pb2.ParamSpec()
            info = ParamInfo(lp.name, index, param, spec.lr_mult, spec.decay_mult, spec.name)
            info.given = {f for f in ("lr_mult", "decay_mult") if spec.HasField(f)}
            if not param.requires_grad:
                info.lr_mult = 0.0
            if spec.name and spec.name in shares:
                owner = shares[spec.name]
                self._check_share(lp, spec, index, owner, param)
                self._merge_multipliers(lp, spec, owner)
                layer.blobs[index] = owner.param
                info.param, info.owner = owner.param, (owner.layer, owner.index)
            elif spec.name:
                shares[spec.name] = info
            self.param_infos.append(info)

    def _merge_multipliers(self, lp, spec, owner: ParamInfo) -> None:
        # Caffe: a sharer may set a multiplier its owner left unset; both set must agree.
        for name in ("lr_mult", "decay_mult"):
            if not spec.HasField(name):
                continue
            value = getattr(spec, name)
            if name in owner.given and getattr(owner, name) != value:
                raise self._fail(
                    lp,
                    f"shared parameter '{spec.name}' has mismatched {name}: "
                    f"{value} here, {getattr(owner, name)} in layer '{owner.layer}'",
                )
            setattr(owner, name, value)
            owner.given.add(name)

    def _check_share(self, lp, spec, index, owner: ParamInfo, param) -> None:
        mine, theirs = tuple(param.shape), tuple(owner.param.shape)
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        same = param.numel() == owner.param.numel() if permissive else mine == theirs
        if not same:
            raise self._fail(
                lp,
                f"shared parameter '{spec.name}' (blob {index}) has shape {list(mine)}, "
                f"but owner layer '{owner.layer}' has {list(theirs)}",
            )
        if mine != theirs:  # Caffe would share the memory under two shapes; one tensor can't
            raise self._fail(
                lp,
                f"PERMISSIVE sharing of '{spec.name}' (blob {index}) with a different shape "
                f"({list(mine)} here, {list(theirs)} in layer '{owner.layer}') is not supported",
            )

    # -- the public view ----------------------------------------------------------------
    @property
    def params(self) -> OrderedDict[str, list[nn.Parameter]]:
        """Learnable blobs by layer name, in Caffe's order (like pycaffe's ``net.params``)."""
        result: OrderedDict[str, list[nn.Parameter]] = OrderedDict()
        for name, step in zip(self.layer_names, self._steps):
            blobs = list(self.layers[step.key].blobs)
            if blobs:
                result[name] = blobs
        return result

    def load_weights(self, paths) -> LoadReport:
        """Copy trained weights by layer name from .caffemodel / .h5 / .pt / .safetensors
        files (a list, or a comma-separated string, loaded in order), as Caffe's
        CopyTrainedLayersFrom does; returns what was copied, ignored and missing."""
        return load_weights(self, paths)

    def save_weights(self, path, *, with_diffs: bool = False) -> None:
        """Write the blobs as .caffemodel, .caffemodel.h5, .pt or .safetensors (by extension)."""
        save_weights(self, path, with_diffs=with_diffs)

    @property
    def blob_loss_weights(self) -> dict[str, float]:
        """Every blob's loss weight (Caffe's blob_loss_weights_): the weight of the layer top
        that last wrote it, 0.0 for blobs that are not losses."""
        weights = dict.fromkeys(self.blob_shapes, 0.0)
        for step in self._steps:
            for index, weight in step.loss_weights:
                weights[step.tops[index]] = float(weight)
        return weights

    @property
    def steps(self) -> tuple[LayerStep, ...]:
        """The layers in forward order with their wiring (``layers[step.key]`` is the module)."""
        return tuple(self._steps)

    def layer(self, name: str) -> CaffeLayer:
        return self.layers[self._steps[self.layer_names.index(name)].key]

    def set_input_arrays(self, data, labels, layer: str | None = None) -> None:
        """Give arrays to the layer that takes them (pycaffe's call, for a MemoryData layer);
        with several such layers, ``layer`` names the one. A DataFeed then serves them."""
        takers = [n for n in self.layer_names if hasattr(self.layer(n), "set_input_arrays")]
        if layer is not None:
            takers = [n for n in takers if n == layer]
        if len(takers) != 1:
            found = f"no such layer named '{layer}'" if layer else f"{len(takers)} of them"
            raise ValueError(f"set_input_arrays needs exactly one layer taking arrays "
                             f"(a MemoryData layer): found {found}")  # fmt: skip
        self.layer(takers[0]).set_input_arrays(data, labels)

    def learnable_params(self) -> list[ParamInfo]:
        """Each learnable blob once (shared ones under their owner), with its multipliers."""
        return [info for info in self.param_infos if info.owner is None]

    # -- running ------------------------------------------------------------------------
    def one_thread(self) -> bool:
        """Whether this net runs on one thread under its thread_policy (see the class)."""
        if self.thread_policy != "auto":
            if self.thread_policy not in THREAD_POLICIES:
                raise CaffeAlexError(f"thread_policy must be one of {THREAD_POLICIES}, got "
                                     f"{self.thread_policy!r}")  # fmt: skip
            return self.thread_policy == "one"
        if self._small is None:
            sizes = [math.prod(s) for s in self.blob_shapes.values()]
            sizes += [info.param.numel() for info in self.param_infos]
            self._small = max(sizes, default=0) < ONE_THREAD_ELEMENTS
        return self._small

    def threads(self) -> contextlib.AbstractContextManager:
        """A context running PyTorch's CPU ops on one thread where ``one_thread()`` says so
        (the previous count comes back at its end); otherwise it changes nothing."""
        if _compiling() or not self.one_thread() or torch.get_num_threads() == 1:
            return contextlib.nullcontext()  # (torch.compile and export trace no thread count)
        return _OneThread()

    def reshape(self, **input_shapes: Sequence[int]) -> None:
        """Re-run shape inference for new input shapes (Caffe's Net::Reshape)."""
        shapes = dict(self.blob_shapes)
        for name, shape in input_shapes.items():
            if name not in self.input_names:
                raise CaffeAlexError(
                    f"'{name}' is not an input of the net; inputs: {self.input_names}"
                )
            shapes[name] = _input_dims(name, shape)
        for position, step in enumerate(self._steps):
            layer = self.layers[step.key]
            try:
                if layer.is_source:  # the given shapes, held to the limits at their layer
                    _checked_tops(step.tops, [shapes[t] for t in step.tops])
                    continue
                tops = layer.top_shapes([shapes[b] for b in step.bottoms])
                tops = _checked_tops(step.tops, [tuple(t) for t in tops])
            except LayerConfigError as exc:
                lp = self.net_param.layer[position]
                raise self._fail(lp, str(exc), position) from None
            for top, shape in zip(step.tops, tops):
                shapes[top] = shape
        self.blob_shapes = shapes
        self._input_shapes = {n: shapes[n] for n in self.input_names}
        self._small = None

    def _bind_inputs(self, args, kwargs) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise CaffeAlexError(
                f"net takes {len(self.input_names)} inputs {self.input_names}, "
                f"got {len(args)} positional"
            )
        blobs = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise CaffeAlexError(
                    f"'{name}' is not an input of the net; inputs: {self.input_names}"
                )
            blobs[name] = value
        missing = [n for n in self.input_names if n not in blobs]
        if missing:
            raise CaffeAlexError(f"missing net input(s) {missing}; inputs: {self.input_names}")
        return blobs

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        # drop the previous pass's blobs first, or they would double the peak memory (set in
        # __dict__: nn.Module's __setattr__ costs more than some small layers' math)
        state = self.__dict__
        state["blobs"], state["loss"] = {}, None
        blobs = self._bind_inputs(args, kwargs)
        shapes = {n: tuple(blobs[n].shape) for n in self.input_names}
        # Under torch.export the check would pin a symbolic batch size to the example's; the
        # layers read their shapes from the tensors anyway.
        if not exporting() and shapes != self._input_shapes:
            self.reshape(**shapes)
        with self.threads():
            loss = self.run(blobs)
        state["blobs"], state["loss"] = blobs, loss
        return {name: blobs[name] for name in self.output_names}

    def run(self, blobs, first: int = 0, last: int | None = None, call=None):
        """The forward loop over the plan, Caffe's ForwardFromTo: the layers at positions
        ``first``..``last`` (inclusive; all by default) read their bottoms from ``blobs`` (a
        mapping by blob name) and write their tops into it; returns the weighted loss of the
        tops they wrote (None when none has a loss weight). The only loop that runs layers:
        ``forward`` runs it as one autograd graph; ``call(position, layer, bottoms)``, when
        given, runs each layer in place of ``layer(*bottoms)`` (layerwise.py: Caffe's blobs,
        one graph per layer) and is also called for a source layer, with ``bottoms`` None."""
        loss = None
        for position in range(first, len(self._steps) if last is None else last + 1):
            step = self._steps[position]
            layer = self.layers[step.key]
            if layer.is_source:
                if call is not None:
                    call(position, layer, None)
                continue
            bottoms = [
                blobs[b].detach() if d else blobs[b] for b, d in zip(step.bottoms, step.detach)
            ]
            out = layer(*bottoms) if call is None else call(position, layer, bottoms)
            if isinstance(out, torch.Tensor):
                out = (out,)
            for top, value in zip(step.tops, out):
                blobs[top] = value
            for index, weight in step.loss_weights:
                term = out[index]
                # a 0-axis loss of weight 1 is its own term (no autograd node for x.sum() * 1),
                # unless a later layer overwrites it in place
                if term.dim() or weight != 1 or index in step.overwritten:
                    term = term.sum() * weight
                loss = term if loss is None else loss + term
        return loss


def _compiling() -> bool:
    probe = getattr(torch.compiler, "is_compiling", None)
    return bool(probe and probe()) or exporting()


class _OneThread:
    """Sets PyTorch's intra-op threads to 1 for its block, then back to what they were."""

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


def _input_dims(name: str, shape) -> Shape:
    """A declared input shape as ints; anything else (1.5, "3") is refused, not truncated."""
    try:
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        given = list(shape) if isinstance(shape, (list, tuple)) else type(shape).__name__
        raise CaffeAlexError(
            f"the shape given for input '{name}' must be a sequence of integers, got {given}"
        ) from None


def _checked_tops(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[Shape]:
    """The shape of each named top as ints, or LayerConfigError naming the top where Caffe's
    Blob::Reshape would refuse it (the caller adds the layer)."""
    return [
        check_blob_shape(s, f"top '{n}' (top {i})") for i, (n, s) in enumerate(zip(names, shapes))
    ]
