"""Caffe's upgrades of legacy nets (V0, V1, input fields, BatchNorm) and solvers (solver_type).

Each case is a small hand-written legacy definition and the current-format text Caffe's
upgrade_proto.cpp makes of it, compared as messages (so which fields are set matters too).
"""

from __future__ import annotations

import logging

import pytest
from google.protobuf import text_format

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import (
    parse_net_text,
    read_net,
    read_solver,
    resolve_snapshot_prefix,
    upgrade_file,
)
from caffe_alex.formats.upgrade import (
    V1_TYPE_NAMES,
    net_needs_upgrade,
    upgrade_net,
    upgrade_solver,
)
from caffe_alex.proto import caffe_pb2


@pytest.fixture
def upgrade_log(caplog):
    """caplog wired straight to the "caffe_alex" logger (the CLI's setup stops propagation)."""
    logger = logging.getLogger("caffe_alex")
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # else the root logger's copy of caplog's handler sees it twice
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def assert_upgrades_to(legacy: str, current: str) -> caffe_pb2.NetParameter:
    upgraded = upgrade_net(net(legacy), "legacy.prototxt")
    expected = net(current)
    assert text_format.MessageToString(upgraded) == text_format.MessageToString(expected)
    assert upgraded == expected
    # current format: nothing legacy left (an old-style BatchNorm still "needs" Caffe's
    # idempotent BatchNorm step, so net_needs_upgrade is not the test here)
    assert not (upgraded.layers or upgraded.input or upgraded.input_dim or upgraded.input_shape)
    return upgraded


V0_NET = """
name: "v0net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 12 input_dim: 12
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer {
    name: "conv1" type: "conv" num_output: 8 kernelsize: 5 stride: 2 group: 1 biasterm: false
    weight_filler { type: "gaussian" std: 0.01 }
    blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers {
  layer { name: "pad2" type: "padding" pad: 1 }
  bottom: "conv1" top: "pad2"
}
layers {
  layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
  bottom: "pad2" top: "pool1"
}
layers {
  layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 }
  bottom: "pool1" top: "norm1"
}
layers {
  layer { name: "fc" type: "innerproduct" num_output: 10 bias_filler { value: 0.1 } }
  bottom: "norm1" top: "fc"
}
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.4 } bottom: "fc" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""

V0_EXPECTED = """
name: "v0net"
layer {
  name: "input" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 8 bias_term: false pad: 2 kernel_size: 5 group: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.01 }
  }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }
}
layer {
  name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 }
}
layer {
  name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc"
  inner_product_param { num_output: 10 bias_filler { value: 0.1 } }
}
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" dropout_param { dropout_ratio: 0.4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_v0_net_with_padding_layers():
    assert_upgrades_to(V0_NET, V0_EXPECTED)


def test_v0_data_layer_fields_and_dropped_fields(upgrade_log):
    legacy = """
      name: "v0data"
      force_backward: true
      layers {
        layer {
          name: "data" type: "data" source: "train_db" meanfile: "mean.binaryproto"
          batchsize: 32 cropsize: 227 mirror: true scale: 0.5 rand_skip: 10
        }
        top: "data" top: "label"
      }
      layers {
        layer { name: "win" type: "window_data" source: "w.txt" batchsize: 4
                det_fg_threshold: 0.6 det_context_pad: 16 det_crop_mode: "square" }
        top: "win" top: "win_label"
      }
      layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "data" top: "r" }
    """
    expected = """
      name: "v0data"
      force_backward: true
      layer {
        name: "data" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.5 mirror: true crop_size: 227 mean_file: "mean.binaryproto" }
        data_param { source: "train_db" batch_size: 32 rand_skip: 10 }
      }
      layer {
        name: "win" type: "WindowData" top: "win" top: "win_label"
        window_data_param { source: "w.txt" batch_size: 4 fg_threshold: 0.6 context_pad: 16
                            crop_mode: "square" }
      }
      layer { name: "r" type: "ReLU" bottom: "data" top: "r" }
    """
    assert_upgrades_to(legacy, expected)
    assert "num_output is not used by layer type relu" in upgrade_log.text
    assert "had problems" in upgrade_log.text


def test_v0_padding_into_a_non_conv_layer_is_refused():
    legacy = (
        'input: "data"\n'
        'layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "p" }\n'
        'layers { layer { name: "relu" type: "relu" } bottom: "p" top: "r" }\n'
    )
    with pytest.raises(CaffeAlexError) as info:
        parse_net_text(legacy, "v0.prototxt")
    assert str(info.value).startswith("v0.prototxt:3: layer 'relu': reads V0 padding layer 'pad'")


def test_unknown_v0_layer_type_is_refused():
    with pytest.raises(CaffeAlexError, match="unknown V0 layer type 'warp'"):
        upgrade_net(net('layers { layer { name: "w" type: "warp" } }'))


V1_NET = """
name: "v1net"
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 4 scale: 0.00390625 crop_size: 24 mirror: true
               mean_file: "m.binaryproto" }
  include { phase: TRAIN }
}
layers {
  name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "w" param: "b" blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } }
}
layers {
  name: "ip_twin" type: INNER_PRODUCT bottom: "data" top: "ip_twin"
  param: "w" blobs_lr: 1
  inner_product_param { num_output: 10 bias_term: false }
}
layers { name: "th" type: TANH bottom: "ip" top: "th" exclude { stage: "deploy" } }
layers { name: "abs" type: ABSVAL bottom: "th" top: "abs" }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "abs" bottom: "label" top: "loss"
         loss_weight: 2 loss_param { ignore_label: 3 } }
"""

V1_EXPECTED = """
name: "v1net"
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 mirror: true crop_size: 24 mean_file: "m.binaryproto" }
  data_param { source: "db" batch_size: 4 }
}
layer {
  name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { name: "w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
  param { name: "b" lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } }
}
layer {
  name: "ip_twin" type: "InnerProduct" bottom: "data" top: "ip_twin"
  param { name: "w" lr_mult: 1 }
  inner_product_param { num_output: 10 bias_term: false }
}
layer { name: "th" type: "TanH" bottom: "ip" top: "th" exclude { stage: "deploy" } }
layer { name: "abs" type: "AbsVal" bottom: "th" top: "abs" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "abs" bottom: "label" top: "loss"
        loss_weight: 2 loss_param { ignore_label: 3 } }
"""


def test_v1_net_enum_types_param_specs_and_transform_fields(upgrade_log):
    assert_upgrades_to(V1_NET, V1_EXPECTED)
    messages = [r.getMessage() for r in upgrade_log.records]
    assert messages == [
        "Attempting to upgrade input file specified using deprecated transformation "
        "parameters: legacy.prototxt",
        "Successfully upgraded file specified using deprecated data transformation parameters",
        "Attempting to upgrade input file specified using deprecated V1LayerParameter: "
        "legacy.prototxt",
        "Successfully upgraded file specified using deprecated V1LayerParameter",
    ]


def test_every_v1_layer_type_has_a_current_name():
    for value in caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR.values:
        assert value.name in V1_TYPE_NAMES
    layers = "".join(
        f"layers {{ name: 'l{i}' type: {name} }}\n" for i, name in enumerate(V1_TYPE_NAMES)
    )
    upgraded = upgrade_net(net(layers))
    assert [layer.type for layer in upgraded.layer] == list(V1_TYPE_NAMES.values())
    assert {"Im2col", "TanH", "HDF5Data", "BNLL", "SoftmaxWithLoss"} <= set(V1_TYPE_NAMES.values())


def test_input_dim_becomes_an_input_layer_first():
    legacy = """
      input: "data" input: "im_info"
      input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
      input_dim: 1 input_dim: 3 input_dim: 1 input_dim: 1
      layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
    """
    expected = """
      layer {
        name: "input" type: "Input" top: "data" top: "im_info"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 3 dim: 1 dim: 1 } }
      }
      layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
    """
    assert_upgrades_to(legacy, expected)


def test_input_shape_becomes_an_input_layer():
    legacy = (
        'input: "x" input_shape { dim: 5 dim: 7 } layer { name: "s" type: "Silence" bottom: "x" }'
    )
    expected = """
      layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 5 dim: 7 } } }
      layer { name: "s" type: "Silence" bottom: "x" }
    """
    assert_upgrades_to(legacy, expected)


def test_input_without_shape_is_just_dropped():
    # Old .caffemodel files name their inputs without shapes; Caffe strips the field.
    assert_upgrades_to('input: "data" layer { name: "a" }', 'layer { name: "a" }')


def test_too_few_input_dims_points_at_the_input_line():
    text = 'name: "n"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\n'
    with pytest.raises(CaffeAlexError) as info:
        parse_net_text(text, "net.prototxt")
    assert str(info.value) == "net.prototxt:2: 1 net input(s) need 4 input_dim entries, found 2"


def test_batch_norm_with_three_param_specs_is_frozen():
    legacy = """
      layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
              param { lr_mult: 1 name: "m" } param { lr_mult: 1 decay_mult: 2 } param { } }
      layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } }
    """
    expected = """
      layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
              param { name: "m" lr_mult: 0 decay_mult: 0 }
              param { lr_mult: 0 decay_mult: 0 }
              param { lr_mult: 0 decay_mult: 0 } }
      layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } }
    """
    assert_upgrades_to(legacy, expected)


def test_mixed_layer_and_layers_is_refused():
    text = (
        'name: "mixed"\n'
        'layers { name: "a" type: RELU bottom: "x" top: "y" }\n'
        'layer { name: "b" type: "ReLU" bottom: "y" top: "z" }\n'
    )
    with pytest.raises(CaffeAlexError) as info:
        parse_net_text(text, "mixed.prototxt")
    error = info.value
    assert (error.file, error.line) == ("mixed.prototxt", 3)
    assert "both 'layer' and legacy 'layers'" in error.message


def test_current_net_is_left_alone(upgrade_log):
    current = net(V1_EXPECTED)
    assert not net_needs_upgrade(current)
    assert upgrade_net(current) == current
    assert upgrade_log.records == []


def test_upgrade_does_not_change_its_argument():
    legacy = net(V1_NET)
    before = legacy.SerializeToString()
    upgrade_net(legacy)
    assert legacy.SerializeToString() == before


@pytest.mark.parametrize(
    "enum, name",
    [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
     ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")],
)  # fmt: skip
def test_solver_type_enum_becomes_type_string(enum, name, upgrade_log):
    legacy = text_format.Parse(
        f'net: "n.prototxt" base_lr: 0.01 solver_mode: GPU solver_type: {enum}',
        caffe_pb2.SolverParameter(),
    )
    expected = text_format.Parse(
        f'net: "n.prototxt" base_lr: 0.01 solver_mode: GPU type: "{name}"',
        caffe_pb2.SolverParameter(),
    )
    assert upgrade_solver(legacy, "solver.prototxt") == expected
    assert "deprecated 'solver_type' field (enum): solver.prototxt" in upgrade_log.text
    assert legacy.HasField("solver_type")  # the argument is not changed


def test_solver_with_both_type_fields_is_refused():
    both = caffe_pb2.SolverParameter(solver_type=caffe_pb2.SolverParameter.ADAM, type="Adam")
    with pytest.raises(CaffeAlexError, match="both the legacy 'solver_type'"):
        upgrade_solver(both, "s.prototxt")


def test_snapshot_prefix_resolution(tmp_path):
    solver = caffe_pb2.SolverParameter()
    resolve_snapshot_prefix(solver, "models/x/solver.prototxt")
    assert solver.snapshot_prefix == "models/x/solver"
    solver.snapshot_prefix = str(tmp_path)
    resolve_snapshot_prefix(solver, "models/x/solver.prototxt")
    assert solver.snapshot_prefix == str(tmp_path / "solver")
    solver.snapshot_prefix = "snapshots/alex"
    resolve_snapshot_prefix(solver, "solver.prototxt")
    assert solver.snapshot_prefix == "snapshots/alex"


def test_upgrade_file_of_a_current_file_says_so(tmp_path, upgrade_log):
    src, dst = tmp_path / "cur.prototxt", tmp_path / "out.prototxt"
    src.write_text(V1_EXPECTED)
    assert upgrade_file(str(src), str(dst)) == "net"
    assert read_net(dst, upgrade=False)[0] == net(V1_EXPECTED)
    assert f"File already in latest proto format: {src}" in upgrade_log.text
    assert f"Wrote upgraded NetParameter text proto to {dst}" in upgrade_log.text


def test_upgrade_file_errors_name_the_line(tmp_path):
    src = tmp_path / "mixed.prototxt"
    src.write_text('layers { name: "a" type: RELU }\nlayer { name: "b" type: "ReLU" }\n')
    with pytest.raises(CaffeAlexError, match=r"mixed.prototxt:2: refusing to upgrade"):
        upgrade_file(str(src), str(tmp_path / "out.prototxt"))
    assert not (tmp_path / "out.prototxt").exists()


def test_upgrade_file_net_and_solver(tmp_path):
    src, dst = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    src.write_text(V0_NET)
    assert upgrade_file(str(src), str(dst)) == "net"
    assert read_net(dst, upgrade=False)[0] == net(V0_EXPECTED)
    assert src.read_text() == V0_NET
    solver_src, solver_dst = tmp_path / "old_solver.prototxt", tmp_path / "solver.prototxt"
    solver_src.write_text('base_lr: 0.1\nsolver_type: ADAM\nnet: "new.prototxt"\n')
    assert upgrade_file(str(solver_src), str(solver_dst)) == "solver"
    # written in field-number order, as Caffe's text printer does
    assert solver_dst.read_text() == 'base_lr: 0.1\nnet: "new.prototxt"\ntype: "Adam"\n'
    assert read_solver(solver_dst, upgrade=False).type == "Adam"
