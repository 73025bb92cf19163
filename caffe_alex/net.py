"""The generic net and Caffe's forward loop. Nothing here names a layer type.

Wiring follows Caffe's Net::Init (netparts/builder.py): layers run in prototxt order; a bottom
is the latest blob of that name (so an in-place layer rebinds the name); a top may reuse a name
only in place. A blob read by several layers needs no Split: autograd sums the gradients, as
Caffe's implicit Split layers do. The net loss is the sum over tops of
``loss_weight * sum(top)``.

Every shape the builder infers (each top, at build and at ``reshape``) and every learnable
blob's shape (before it is filled) is held to Caffe's Blob::Reshape limits: no negative
dimension, at most INT_MAX elements, at most 32 axes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import layers  # noqa: F401  (importing the package registers the built-in layer types)
from .errors import CaffeAlexError, SourceMap
from .formats.filtering import make_state
from .formats.prototxt import read_net
from .formats.weights import LoadReport, load_weights, save_weights
from .netparts.builder import PlanBuilder, filtered_for
from .netparts.inputs import bind_inputs, input_dims
from .netparts.plan import LayerStep, ParamInfo
from .netparts.shapes import reshaped
from .netparts.threads import (
    ONE_THREAD_ELEMENTS,
    THREAD_POLICIES,
    is_small,
    policy_says_one,
    thread_block,
)
from .proto import caffe_pb2
from .registry import CaffeLayer, Shape, exporting

__all__ = ["ONE_THREAD_ELEMENTS", "THREAD_POLICIES", "LayerStep", "Net", "ParamInfo"]


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
        # _origin: each layer's position in the source, for the line of an error
        filtered, self._origin = filtered_for(net_param, state, insert_splits, self.source)
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
        self._small: bool | None = None  # every blob under ONE_THREAD_ELEMENTS (None: unknown)
        self._skipped: frozenset[int] = frozenset()  # positions run() skips (``loss_only``)
        self._dead_ends: frozenset[int] | None = None
        overrides = {k: input_dims(k, v) for k, v in (input_shapes or {}).items()}
        self._steps: list[LayerStep] = PlanBuilder(self, overrides).build(filtered)
        self._input_shapes = {n: self.blob_shapes[n] for n in self.input_names}

    @classmethod
    def from_prototxt(cls, path: str, phase: str = "TEST", **kwargs) -> Net:
        """Read (text or binary), upgrade and build a net definition file."""
        net_param, source = read_net(path)
        return cls(net_param, phase, source=source, **kwargs)

    def _fail(self, layer_param, message: str, position: int | None = None) -> CaffeAlexError:
        """An error at the layer being built (or at ``position`` in the filtered net)."""
        position = len(self.layer_names) if position is None else position
        index = self._origin[position] if position < len(self._origin) else None
        return self.source.error(message, layer_param.name, layer_param.type, index)

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
            return policy_says_one(self.thread_policy)
        if self._small is None:
            self._small = is_small(self.blob_shapes, self.param_infos)
        return self._small

    def threads(self) -> contextlib.AbstractContextManager:
        """A context running PyTorch's CPU ops on one thread where ``one_thread()`` says so
        (the previous count comes back at its end); otherwise it changes nothing."""
        return thread_block(self.one_thread)

    @contextlib.contextmanager
    def loss_only(self, enabled: bool = True):
        """Within it, forward skips the pure layers (``CaffeLayer.pure``: Accuracy) whose tops
        no loss needs: for a training pass whose outputs no one reads (the solver's iterations
        between displays). The loss and its gradients are the same; the skipped tops are
        missing from ``blobs`` and the outputs."""
        if enabled and self._dead_ends is None:
            self._dead_ends = self._unneeded_pure_layers()
        state = self.__dict__
        before = state["_skipped"]
        state["_skipped"] = self._dead_ends if enabled else frozenset()
        try:
            yield self
        finally:
            state["_skipped"] = before

    def _unneeded_pure_layers(self) -> frozenset[int]:
        """Positions of pure layers no loss depends on (walking back from the losses: a layer
        is needed when it has a loss weight, writes a blob a needed layer reads, or is not
        pure, since its effects may matter: a random draw, a running average)."""
        needed, unneeded = set(), set()
        for position in range(len(self._steps) - 1, -1, -1):
            step = self._steps[position]
            if (step.loss_weights or not self.layers[step.key].pure
                    or any(top in needed for top in step.tops)):  # fmt: skip
                needed.update(step.bottoms)
            else:
                unneeded.add(position)
        return frozenset(unneeded)

    def reshape(self, **input_shapes: Sequence[int]) -> None:
        """Re-run shape inference for new input shapes (Caffe's Net::Reshape)."""
        shapes = reshaped(self, input_shapes)
        self.blob_shapes = shapes
        self._input_shapes = {n: shapes[n] for n in self.input_names}
        self._small = None

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        # drop the previous pass's blobs first, or they would double the peak memory (set in
        # __dict__: nn.Module's __setattr__ costs more than some small layers' math)
        state = self.__dict__
        state["blobs"], state["loss"] = {}, None
        blobs = bind_inputs(self.input_names, args, kwargs)
        shapes = {n: tuple(blobs[n].shape) for n in self.input_names}
        # Under torch.export the check would pin a symbolic batch size to the example's; the
        # layers read their shapes from the tensors anyway.
        if not exporting() and shapes != self._input_shapes:
            self.reshape(**shapes)
        with self.threads():
            loss = self.run(blobs)
        state["blobs"], state["loss"] = blobs, loss
        if self._skipped:
            return {name: blobs[name] for name in self.output_names if name in blobs}
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
        # the layers by key as a plain dict, read once: ModuleDict's lookup through
        # nn.Module.__getattr__ cost a small net 5 us per layer and iteration
        by_key = self._modules["layers"]._modules
        skipped = self._skipped
        for position in range(first, len(self._steps) if last is None else last + 1):
            if position in skipped:
                continue
            step = self._steps[position]
            layer = by_key[step.key]
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
