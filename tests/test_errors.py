"""Bad net definitions fail with one line naming the file, the line, the layer and the problem.
The messages are asserted whole: they are the user interface."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net

HEAD = """name: "bad"
layer {
  name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } }
}
"""


def error_of(tmp_path, text: str) -> str:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    return str(info.value).replace(str(tmp_path) + "/", "")


def test_syntax_error_names_line_column_and_token(tmp_path):
    text = (
        HEAD
        + """layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size 3 }
}
"""
    )
    assert error_of(tmp_path, text) == 'net.prototxt:8:49: syntax error: expected ":" but found "3"'


def test_unknown_type(tmp_path):
    message = error_of(
        tmp_path, HEAD + '\nlayer { name: "m" type: "Mystery" bottom: "data" top: "m" }\n'
    )
    assert message.startswith(
        "net.prototxt:7: layer 'm' (Mystery): unknown layer type 'Mystery': neither BVLC "
        "Caffe's nor a fork's that caffe-alex implements (docs/forks.md); add it in a few lines "
        "with caffe_alex.register (docs/forks.md, 'Your own fork'); known types: AbsVal, Accuracy, "
    )
    assert "\n" not in message


def test_unknown_bottom(tmp_path):
    text = HEAD + 'layer { name: "relu" type: "ReLU" bottom: "dta" top: "relu" }\n'
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'relu' (ReLU): unknown bottom blob 'dta' (bottom index 0)"
    )


def test_top_produced_twice_not_in_place(tmp_path):
    text = HEAD + (
        'layer { name: "a" type: "ReLU" bottom: "data" top: "out" }\n'
        'layer { name: "b" type: "TanH" bottom: "data" top: "out" }\n'
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:7: layer 'b' (TanH): top blob 'out' produced by multiple sources "
        "(already by layer 'a')"
    )


def test_in_place_top_is_fine(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" top: "data" }\n')
    assert Net.from_prototxt(str(path)).output_names == ["data"]


def test_wrong_number_of_bottoms(tmp_path):
    text = HEAD + 'layer { name: "sm" type: "Softmax" bottom: "data" bottom: "data" top: "sm" }\n'
    assert (
        error_of(tmp_path, text)
        == "net.prototxt:6: layer 'sm' (Softmax): takes 1 bottom blob(s), got 2"
    )


def test_shape_mismatch_in_eltwise(tmp_path):
    text = """name: "bad"
layer {
  name: "data" type: "Input" top: "a" top: "b"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 3 dim: 4 dim: 4 } }
}
layer {
  name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum"
}
"""
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'sum' (Eltwise): all bottoms must have the same shape: "
        "bottom 0 is [1, 3, 8, 8], bottom 1 is [1, 3, 4, 4]"
    )


def test_missing_required_field(tmp_path):
    text = HEAD + (
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"\n'
        "        convolution_param { num_output: 4 } }\n"
    )
    message = error_of(tmp_path, text)
    assert message.startswith("net.prototxt:6: layer 'conv1' (Convolution): ")
    assert "kernel" in message


def test_missing_file():
    with pytest.raises(CaffeAlexError, match="/no/such/net.prototxt"):
        Net.from_prototxt("/no/such/net.prototxt")


def test_cli_prints_one_line_and_exits_1(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(HEAD + 'layer { name: "relu" type: "ReLU" bottom: "dta" top: "relu" }\n')
    result = CliRunner().invoke(main, ["time", "--model", str(path), "--iterations", "1"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1] == (
        f"caffe-alex: error: {path}:6: layer 'relu' (ReLU): "
        "unknown bottom blob 'dta' (bottom index 0)"
    )
    assert "Traceback" not in result.output


def test_layers_sharing_a_name_keep_their_own_lines(tmp_path):
    text = (
        HEAD
        + """layer {
  name: "act" type: "ReLU" bottom: "data" top: "act"
  include { phase: TRAIN }
}
layer {
  name: "act" type: "ReLU" bottom: "missing" top: "act"
  include { phase: TEST }
}
"""
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:10: layer 'act' (ReLU): unknown bottom blob 'missing' (bottom index 0)"
    )


def test_unsupported_field(tmp_path):
    # Caffe's EuclideanLoss silently ignores loss_param; we say so instead of ignoring it
    text = HEAD + (
        'layer { name: "l2" type: "EuclideanLoss" bottom: "data" bottom: "data" top: "l2"\n'
        "        loss_param { ignore_label: 255 } }\n"
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'l2' (EuclideanLoss): loss_param.ignore_label is not supported "
        "by this layer"
    )


def test_loss_weight_and_propagate_down_counts(tmp_path):
    two_tops = HEAD.replace('top: "data"', 'top: "data" top: "label"').replace(
        "shape { dim: 1 dim: 3 dim: 8 dim: 8 }", "shape { dim: 1 dim: 3 } shape { dim: 1 }"
    )
    text = two_tops + (
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label"\n'
        '        top: "loss" top: "prob" }\n'
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'loss' (SoftmaxWithLoss): a loss layer with 2 tops needs "
        "loss_weight once per top (e.g. loss_weight: 1 loss_weight: 0)"
    )
    text = HEAD + (
        'layer { name: "r" type: "ReLU" bottom: "data" top: "r"\n'
        "        propagate_down: true propagate_down: false }\n"
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'r' (ReLU): propagate_down must be given once per bottom or "
        "not at all (2 for 1 bottoms)"
    )
    text = HEAD + (
        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" loss_weight: 1 loss_weight: 2 }\n'
    )
    assert error_of(tmp_path, text) == (
        "net.prototxt:6: layer 'r' (ReLU): loss_weight must be given once per top or not at all "
        "(2 for 1 tops)"
    )
