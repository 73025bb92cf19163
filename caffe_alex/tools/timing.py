"""Layer-by-layer timing of a net, like ``caffe time``.

Caffe times each layer's Forward and, in reverse order, each layer's Backward. Here the layers
run as Caffe runs them (layerwise.py's BlobExecutor: persistent blobs, each layer's forward
and backward one at a time, a diff from every layer that computes one) and the executor's
callbacks time them; a net without a loss is timed from its outputs (each output's diff 1), as
every layer a net has counts in ``caffe time``. The whole-net forward and backward are timed
too, through the ordinary module, since that is what training runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..layerwise import BlobExecutor
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


class LayerClock:
    """Milliseconds per layer of an executor's forward and backward passes, summed over the
    passes it saw (its callbacks start and stop the clock around each layer)."""

    def __init__(self, executor: BlobExecutor, device: torch.device):
        n = len(executor.steps)
        self.forward_ms, self.backward_ms = [0.0] * n, [0.0] * n
        self._device, self._started = device, 0.0
        executor.hooks["before_forward"].append(self._start)
        executor.hooks["after_forward"].append(lambda i: self._stop(self.forward_ms, i))
        executor.hooks["before_backward"].append(self._start)
        executor.hooks["after_backward"].append(lambda i: self._stop(self.backward_ms, i))

    def _start(self, position: int) -> None:
        _sync(self._device)
        self._started = time.perf_counter()

    def _stop(self, times: list[float], position: int) -> None:
        _sync(self._device)
        times[position] += (time.perf_counter() - self._started) * 1000.0

    @property
    def total_ms(self) -> float:
        return sum(self.forward_ms) + sum(self.backward_ms)


def layerwise_executor(net: Net, inputs: dict, device: torch.device) -> BlobExecutor:
    """The net run as Caffe runs it, its input blobs holding ``inputs``."""
    executor = BlobExecutor(net, device, outputs_as_losses=True)
    for name, value in inputs.items():
        executor.blobs[name].put(value)
    return executor


def layerwise_iteration(executor: BlobExecutor) -> None:
    """One forward and one backward, layer by layer; the parameter diffs start from zero."""
    executor.net.zero_grad(set_to_none=True)
    executor.forward()
    executor.backward()


def time_net(
    net: Net, iterations: int = 50, device: torch.device | str = "cpu", log=None
) -> TimingReport:
    device = torch.device(device)
    net.to(device)
    inputs = make_inputs(net, device)
    log = log or (lambda message: None)
    executor, initial_loss = _warm_up(net, inputs, device, log)
    clock = LayerClock(executor, device)
    log("*** Benchmark begins ***")
    log(f"Testing for {iterations} iterations.")
    iteration_ms, net_fwd, net_bwd = [], 0.0, 0.0
    for it in range(iterations):
        before = clock.total_ms
        layerwise_iteration(executor)
        iteration_ms.append(clock.total_ms - before)
        log(f"Iteration: {it + 1} forward-backward time: {iteration_ms[-1]:.4g} ms.")
        forward_ms, backward_ms = _whole_module_iteration(net, inputs, device)
        net_fwd += forward_ms
        net_bwd += backward_ms
    return TimingReport(
        iterations,
        list(net.layer_names),
        [f / iterations for f in clock.forward_ms],
        [b / iterations for b in clock.backward_ms],
        iteration_ms,
        net_fwd / iterations,
        net_bwd / iterations,
        initial_loss,
    )


def _warm_up(net: Net, inputs: dict, device: torch.device, log) -> tuple[BlobExecutor, float]:
    """Caffe's warm-up: one forward (its loss is printed) and one backward, both untimed.
    Returns the layer-by-layer executor, warmed up too, and the loss."""
    log("Performing Forward")
    net(**inputs)
    initial_loss = float(net.loss.detach()) if net.loss is not None else 0.0
    log(f"Initial loss: {initial_loss}")
    log("Performing Backward")
    executor = layerwise_executor(net, inputs, device)
    layerwise_iteration(executor)
    return executor, initial_loss


def _whole_module_iteration(net: Net, inputs: dict, device: torch.device) -> tuple[float, float]:
    """Milliseconds of one forward and one backward of the ordinary module (one autograd
    graph); the backward is 0 where nothing needs a gradient."""
    outputs, forward_ms = _timed(lambda: net(**inputs), device)
    target = (
        net.loss
        if net.loss is not None
        else sum(o.sum() for o in outputs.values() if o.requires_grad)
    )
    backward_ms = 0.0
    if isinstance(target, torch.Tensor) and target.requires_grad:
        _, backward_ms = _timed(target.backward, device)
    net.zero_grad(set_to_none=True)
    return forward_ms, backward_ms


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
