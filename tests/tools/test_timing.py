"""`caffe-alex time`: the layer-by-layer backward computes the same gradients as the whole
module, every layer gets a line, and the CLI prints Caffe's summary lines."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.net import Net
from caffe_alex.tools.timing import (
    LayerClock,
    layerwise_executor,
    layerwise_iteration,
    make_inputs,
    report_lines,
    time_net,
)
from tests.paths import ROOT
from tests.reference import parse_net, randomize
from tests.test_devices import MIXED_NET


def test_layerwise_backward_matches_whole_module_gradients():
    net = Net(parse_net(MIXED_NET), "TEST")
    randomize(net, seed=3)
    inputs = make_inputs(net, torch.device("cpu"))
    net(**inputs)
    net.loss.backward()
    expected = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    executor = layerwise_executor(net, inputs, torch.device("cpu"))
    clock = LayerClock(executor, torch.device("cpu"))
    layerwise_iteration(executor)
    for got, want in zip([p.grad for p in net.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(f > 0 for f, name in zip(clock.forward_ms[1:], net.layer_names[1:]))
    assert clock.backward_ms[net.layer_names.index("conv1")] > 0


def test_report_has_a_forward_and_backward_line_per_layer():
    net = Net(parse_net(MIXED_NET), "TRAIN")
    report = time_net(net, iterations=2)
    lines = report_lines(report)
    for name in net.layer_names:
        assert any(
            re.fullmatch(rf"\s*{re.escape(name)}\tforward: [\d.e+-]+ ms\.", ln) for ln in lines
        )
        assert any(
            re.fullmatch(rf"\s*{re.escape(name)}\tbackward: [\d.e+-]+ ms\.", ln) for ln in lines
        )
    assert len(report.iteration_ms) == 2


def test_time_command_prints_caffe_summary(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(MIXED_NET)
    result = CliRunner().invoke(main, ["time", "-model", str(path), "-iterations", "2"])
    assert result.exit_code == 0, result.output
    for phrase in (
        "*** Benchmark begins ***",
        "Testing for 2 iterations.",
        "Iteration: 2 forward-backward time:",
        "Average time per layer:",
        "Average Forward pass:",
        "Average Backward pass:",
        "Average Forward-Backward:",
        "Total Time:",
        "*** Benchmark ends ***",
    ):
        assert phrase in result.output
    first = next(line for line in result.output.splitlines() if "Benchmark begins" in line)
    assert re.match(r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \w+\.py:\d+\] ", first)


@pytest.mark.slow
def test_time_accepts_input_shapes_for_data_layers_without_source(tmp_path):
    model = str(ROOT / "models/bvlc_alexnet/train_val.prototxt")
    args = ["time", "--model", model, "--iterations", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--input-shape data=N,C,H,W" in result.output
    result = CliRunner().invoke(
        main, [*args, "--input-shape", "data=2,3,227,227", "--input-shape", "label=2"]
    )
    assert result.exit_code == 0, result.output
    assert "      conv1\tforward:" in result.output
