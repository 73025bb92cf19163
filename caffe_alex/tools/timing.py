"""Layer-by-layer timing of a net, like ``caffe time``.

Caffe times each layer's Forward and, in reverse order, each layer's Backward. Autograd runs a
whole backward graph at once, so to time layers one by one every layer here reads detached copies
of its bottoms; its backward is then ``autograd.backward`` from its tops to those copies, and the
resulting bottom gradients are handed to the layer that produced each bottom (summed when a blob
has several readers, as Caffe's Split does). The whole-net forward and backward are timed too,
through the ordinary module, since that is what training runs.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from ..net import Net


@dataclass
class TimingReport:
    iterations: int
    layer_names: list[str]
    forward_ms: list[float]  # per layer, averaged over iterations
    backward_ms: list[float]
    iteration_ms: list[float] = field(default_factory=list)  # layer-by-layer fwd+bwd per iteration
    net_forward_ms: float = 0.0  # whole module, averaged
    net_backward_ms: float = 0.0
    initial_loss: float = 0.0

    @property
    def forward_total_ms(self) -> float:
        return sum(self.forward_ms)

    @property
    def backward_total_ms(self) -> float:
        return sum(self.backward_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(net: Net, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the net's input shapes; inputs read as labels get zeros (class 0)."""
    gen = torch.Generator().manual_seed(seed)
    label_like = set()
    for step in net.steps:
        layer = net.layers[step.key]
        if layer.is_loss or layer.type_name == "Accuracy":
            label_like.update(step.bottoms[1:])
    inputs = {}
    for name in net.input_names:
        shape = net.blob_shapes[name]
        value = torch.zeros(shape) if name in label_like else torch.randn(shape, generator=gen)
        inputs[name] = value.to(device)
    return inputs


def _timed(fn, device: torch.device) -> tuple[object, float]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, (time.perf_counter() - start) * 1000.0


def _layerwise_iteration(net: Net, inputs, device, fwd: list[float], bwd: list[float]) -> None:
    values = {name: (tensor, None) for name, tensor in inputs.items()}
    records = []
    for i, step in enumerate(net.steps):
        layer = net.layers[step.key]
        if layer.is_source:
            records.append(None)
            continue
        sources = [values[b] for b in step.bottoms]
        # net inputs get no gradient, as Caffe's data layers need none
        leaves = [
            t.detach().requires_grad_(t.is_floating_point() and not d and o is not None)
            for (t, o), d in zip(sources, step.detach)
        ]
        out, ms = _timed(lambda layer=layer, leaves=leaves: layer(*leaves), device)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        fwd[i] += ms
        records.append((leaves, [origin for _, origin in sources], out))
        for j, top in enumerate(step.tops):
            values[top] = (out[j], (i, j))
    grads = _seed_gradients(net, records)
    for i in reversed(range(len(net.steps))):
        if records[i] is None:
            continue
        leaves, origins, out = records[i]
        pairs = [
            (o, grads.pop((i, j))) for j, o in enumerate(out) if (i, j) in grads and o.requires_grad
        ]
        layer = net.layers[net.steps[i].key]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        wanted += [p for p in layer.parameters() if p.requires_grad]
        if not pairs or not wanted:
            continue
        tops, top_grads = zip(*pairs)
        _, ms = _timed(
            functools.partial(torch.autograd.backward, tops, top_grads, inputs=wanted), device
        )
        bwd[i] += ms
        for leaf, origin in zip(leaves, origins):
            if origin is not None and leaf.grad is not None:
                grads[origin] = grads[origin] + leaf.grad if origin in grads else leaf.grad


def _seed_gradients(net: Net, records) -> dict[tuple[int, int], torch.Tensor]:
    grads = {}
    for i, step in enumerate(net.steps):
        if records[i] is None:
            continue
        for j, weight in step.loss_weights:
            grads[(i, j)] = torch.full_like(records[i][2][j], weight)
    if not grads:  # no loss: start from the outputs with unit gradients, so backward still runs
        last_writer = {}
        for i, step in enumerate(net.steps):
            for j, top in enumerate(step.tops):
                if records[i] is not None:
                    last_writer[top] = (i, j)
        for name in net.output_names:
            if name in last_writer:
                i, j = last_writer[name]
                grads[(i, j)] = torch.ones_like(records[i][2][j])
    return grads


def time_net(
    net: Net, iterations: int = 50, device: torch.device | str = "cpu", log=None
) -> TimingReport:
    device = torch.device(device)
    net.to(device)
    inputs = make_inputs(net, device)
    log = log or (lambda message: None)
    n = len(net.steps)
    # Caffe's warm-up: one forward (its loss is printed) and one backward, both untimed
    log("Performing Forward")
    net(**inputs)
    initial_loss = float(net.loss.detach()) if net.loss is not None else 0.0
    log(f"Initial loss: {initial_loss}")
    log("Performing Backward")
    _layerwise_iteration(net, inputs, device, [0.0] * n, [0.0] * n)
    net.zero_grad(set_to_none=True)
    log("*** Benchmark begins ***")
    log(f"Testing for {iterations} iterations.")
    fwd, bwd = [0.0] * n, [0.0] * n
    iteration_ms, net_fwd, net_bwd = [], 0.0, 0.0
    for it in range(iterations):
        before = sum(fwd) + sum(bwd)
        _layerwise_iteration(net, inputs, device, fwd, bwd)
        iteration_ms.append(sum(fwd) + sum(bwd) - before)
        log(f"Iteration: {it + 1} forward-backward time: {iteration_ms[-1]:.4g} ms.")
        outputs, ms = _timed(lambda: net(**inputs), device)
        net_fwd += ms
        target = (
            net.loss
            if net.loss is not None
            else sum(o.sum() for o in outputs.values() if o.requires_grad)
        )
        if isinstance(target, torch.Tensor) and target.requires_grad:
            _, ms = _timed(target.backward, device)
            net_bwd += ms
        net.zero_grad(set_to_none=True)
    return TimingReport(
        iterations,
        list(net.layer_names),
        [f / iterations for f in fwd],
        [b / iterations for b in bwd],
        iteration_ms,
        net_fwd / iterations,
        net_bwd / iterations,
        initial_loss,
    )


def report_lines(report: TimingReport) -> list[str]:
    """The summary in ``caffe time``'s shape (per-layer lines, then the averages)."""
    lines = ["Average time per layer: "]
    for name, f, b in zip(report.layer_names, report.forward_ms, report.backward_ms):
        lines.append(f"{name:>10}\tforward: {f:.5g} ms.")
        lines.append(f"{name:>10}\tbackward: {b:.5g} ms.")
    lines += [
        f"Average Forward pass: {report.forward_total_ms:.5g} ms.",
        f"Average Backward pass: {report.backward_total_ms:.5g} ms.",
        f"Average Forward-Backward: {report.forward_total_ms + report.backward_total_ms:.5g} ms.",
        f"Total Time: {sum(report.iteration_ms):.5g} ms.",
        f"Whole-module forward (one autograd graph): {report.net_forward_ms:.5g} ms.",
        f"Whole-module backward (one autograd graph): {report.net_backward_ms:.5g} ms.",
    ]
    return lines
