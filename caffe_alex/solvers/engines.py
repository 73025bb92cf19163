"""How a solver runs one of its nets, the plan built by net.py, executed one of two ways:

- ``GraphEngine``: the net's nn.Module, the whole forward as one autograd graph and one
  backward through it (training's fast path; the precision policy, channels_last and compile
  apply to it). Intermediate diffs are not kept: autograd frees them as it goes.
- ``BlobEngine``: Caffe's execution (layerwise.py's BlobExecutor): persistent blobs, layer by
  layer forward and backward, every blob's diff kept after the backward as Caffe keeps it. The
  solvers of pycaffe use it, so that ``solver.net.blobs[...]`` shows what Caffe shows after
  ``step`` and ``net.after_backward`` callbacks run between layers. Where nothing can watch a
  blob between two iterations (no Python layer, no layer hook), the solver asks it to skip the
  blobs (``skip_blobs``) for every iteration but the last of a ``step`` and every test batch
  but the last of a pass: such a pass runs as one graph (the same numbers, the same data and
  random draws, in one backward instead of one per layer), and the blobs Python reads after
  ``step`` or a test are those of the last pass, run layer by layer, as Caffe leaves them.

Both answer ``forward(batch, grad)`` with (outputs by name, loss tensor or None),
``backward(loss)``, and ``blob(name)`` (a blob's values after the last forward).
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError
from ..layerwise import BlobExecutor


def make_engines(nets: dict, precision, device, feeds, layerwise: bool) -> dict:
    """An engine for each of a solver's ``nets`` (by feed key: "train", a test net's index):
    GraphEngines, or with ``layerwise`` BlobEngines drawing their batches from ``feeds``."""
    if not layerwise:
        return {key: GraphEngine(net, precision) for key, net in nets.items()}
    if precision.autocast is not None or precision.channels_last:
        raise CaffeAlexError("precision and channels_last need the nets run as one graph "
                             "(not layerwise)")  # fmt: skip
    return {key: BlobEngine(net, device, precision, source=lambda key=key: next(feeds[key]))
            for key, net in nets.items()}  # fmt: skip


class GraphEngine:
    skip_blobs = False  # it keeps no persistent blobs: nothing to skip

    def __init__(self, net, precision):
        self.net, self.precision = net, precision
        self.loss_only = False  # set by the solver: a pass whose outputs no one reads

    def forward(self, batch: dict, grad: bool = True):
        # a compiled forward would trace the skipping as a second graph: it runs every layer
        loss_only = self.loss_only and getattr(self.net, "_compiled_call_impl", None) is None
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            with self.net.loss_only(loss_only):
                outputs = self.precision.run(self.net, batch)
        return outputs, self.net.loss

    def backward(self, loss) -> None:
        if loss is not None and loss.requires_grad:
            self.precision.backward(loss)

    def blob(self, name: str) -> torch.Tensor:
        return self.net.blobs[name]


class BlobEngine:
    def __init__(self, net, device, precision, source=None):
        self.net = net
        self.executor = BlobExecutor(net, device, source=source)
        self.graph = GraphEngine(net, precision)
        self.skip_blobs = False  # set by the solver before each pass (see the module's notes)
        self.loss_only = False  # (as GraphEngine's, for the passes run as one graph)
        self._as_graph = False  # how the last forward ran

    def _unwatched(self) -> bool:
        """Nothing runs between the layers: no Python layer, no before/after hook."""
        executor = self.executor
        return not executor.has_python_layer() and not any(executor.hooks.values())

    def forward(self, batch: dict, grad: bool = True):
        self._as_graph = self.skip_blobs and batch is not None and self._unwatched()
        if self._as_graph:
            self.executor.sync_params()  # values Python wrote into a parameter's blob
            self.graph.loss_only = self.loss_only
            return self.graph.forward(batch, grad)
        loss = self.executor.forward(batch=batch, record=grad)
        blobs = self.executor.blobs
        return {name: blobs[name].data_tensor() for name in self.net.output_names}, loss

    def backward(self, loss) -> None:
        if self._as_graph:
            self.graph.backward(loss)
        else:
            self.executor.backward()

    def blob(self, name: str) -> torch.Tensor:
        if self._as_graph:
            return self.graph.blob(name)
        return self.executor.blobs[name].data_tensor()
