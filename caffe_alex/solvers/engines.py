"""How a solver runs one of its nets, the plan built by net.py, executed one of two ways:

- ``GraphEngine``: the net's nn.Module, the whole forward as one autograd graph and one
  backward through it (training's fast path; the precision policy, channels_last and compile
  apply to it). Intermediate diffs are not kept: autograd frees them as it goes.
- ``BlobEngine``: Caffe's execution (layerwise.py's BlobExecutor): persistent blobs, layer by
  layer forward and backward, every blob's diff kept after the backward as Caffe keeps it. The
  solvers of pycaffe use it, so that ``solver.net.blobs[...]`` shows what Caffe shows after
  ``step`` and ``net.after_backward`` callbacks run between layers.

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
    return {key: BlobEngine(net, device, source=lambda key=key: next(feeds[key]))
            for key, net in nets.items()}  # fmt: skip


class GraphEngine:
    def __init__(self, net, precision):
        self.net, self.precision = net, precision

    def forward(self, batch: dict, grad: bool = True):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            outputs = self.precision.run(self.net, batch)
        return outputs, self.net.loss

    def backward(self, loss) -> None:
        if loss is not None and loss.requires_grad:
            self.precision.backward(loss)

    def blob(self, name: str) -> torch.Tensor:
        return self.net.blobs[name]


class BlobEngine:
    def __init__(self, net, device, source=None):
        self.net = net
        self.executor = BlobExecutor(net, device, source=source)

    def forward(self, batch: dict, grad: bool = True):
        loss = self.executor.forward(batch=batch, record=grad)
        blobs = self.executor.blobs
        return {name: blobs[name].data_tensor() for name in self.net.output_names}, loss

    def backward(self, loss) -> None:
        self.executor.backward()

    def blob(self, name: str) -> torch.Tensor:
        return self.executor.blobs[name].data_tensor()
