"""Reading and writing net/solver files: errors with file:line:column, binary, SourceMap."""

from __future__ import annotations

import os
import stat

import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import (
    net_to_text,
    parse_net_text,
    read_any,
    read_net,
    read_solver,
    solver_to_text,
    write_binary,
    write_text,
)
from caffe_alex.proto import caffe_pb2


def _error(text: str, name: str = "net.prototxt") -> str:
    with pytest.raises(CaffeAlexError) as info:
        parse_net_text(text, name)
    message = str(info.value)
    assert "\n" not in message
    return message


# (text, the one-line error). Columns are 1-based characters, as editors show them.
SYNTAX_ERRORS = [
    (
        'name: "x"\nlayer {\n  name: "a"\n  convolution_param kernel_size: 3 }\n}\n',
        'net.prototxt:4:21: syntax error: expected "{" but found "kernel_size"',
    ),
    (
        'layer {\n  name: "a"\n',
        'net.prototxt:2:9: syntax error: expected "}" but found end of file',
    ),
    ("layer { name", 'net.prototxt:1:13: syntax error: expected ":" but found end of file'),
    (
        'layer { name: "a" } }',
        'net.prototxt:1:21: syntax error: expected a field name but found "}"',
    ),
    ("layer { type: 3 }", 'net.prototxt:1:15: syntax error: expected a string but found "3"'),
    (
        "layer { convolution_param { kernel_size: 3.5 } }",
        'net.prototxt:1:42: syntax error: expected an integer but found "3.5"',
    ),
    (
        "layer { convolution_param { bias_term: maybe } }",
        'net.prototxt:1:40: syntax error: expected "true" or "false" but found "maybe"',
    ),
    (
        'layer {\n  name: "ab\n}',
        'net.prototxt:2:9: syntax error: string "ab has no closing quote on its line',
    ),
    (
        "layer {\n    bogus: 3\n}",
        'net.prototxt:2:5: unknown field "bogus" in LayerParameter (neither BVLC Caffe nor a '
        "fork caffe-alex reads has it; for another fork, give its caffe.proto: caffe-alex "
        "--proto FILE)",
    ),
    (
        "layer {\n\tpooling_param { pool: MAXX } }",  # a tab counts as one column
        'net.prototxt:2:24: unknown value "MAXX" for PoolingParameter.PoolMethod '
        "(one of MAX, AVE, STOCHASTIC)",
    ),
    (
        'name: "a"\nname: "b"\n',
        'net.prototxt:2:7: field "name" of NetParameter holds one value but is given more '
        "than once",
    ),
    (
        "# a comment with layer { in it\nlayer { convolution_param { kernel_size: -1 } }",
        "net.prototxt:2:42: value -1 is out of range for this field",
    ),
]


@pytest.mark.parametrize("text, expected", SYNTAX_ERRORS)
def test_syntax_errors_name_file_line_column_and_token(text, expected):
    assert _error(text) == expected


def test_syntax_error_from_file_has_parts(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer {\n  name: "a"\n  convolution_param kernel_size: 3 }\n}\n')
    with pytest.raises(CaffeAlexError) as info:
        read_net(path)
    error = info.value
    assert (error.file, error.line, error.column) == (str(path), 3, 21)
    assert '"kernel_size"' in error.message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.prototxt"
    with pytest.raises(CaffeAlexError, match="no such file: .*nope.prototxt"):
        read_net(path)
    with pytest.raises(CaffeAlexError, match="nope.prototxt"):
        read_solver(str(path))


SMALL_NET = """\
name: "small"  # layer { inside a comment is ignored
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer {
  name: "conv"
  type: "Convolution"
  bottom: "data"
  top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer { name: "label'{" type: "ReLU" bottom: "conv" top: "conv" }

layer
{
  name: "pool"
  type: "Pooling"
  bottom: "conv"
  top: "pool"
}
"""


def test_source_map_for_a_current_net(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(SMALL_NET)
    net, source = read_net(path)
    assert [layer.name for layer in net.layer] == ["input", "conv", "label'{", "pool"]
    assert source.path == str(path)
    assert source.layer_lines == {"input": 2, "conv": 4, "label'{": 11, "pool": 13}


V1_NET = """\
name: "v1"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 8
input_dim: 8
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  convolution_param { num_output: 2 kernel_size: 3 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
"""


def test_source_map_for_a_v1_net_survives_the_upgrade():
    net, source = parse_net_text(V1_NET, "v1.prototxt")
    assert [(layer.name, layer.type) for layer in net.layer] == [
        ("input", "Input"),
        ("conv1", "Convolution"),
        ("relu1", "ReLU"),
    ]
    assert source.layer_lines == {"input": 2, "conv1": 7, "relu1": 16}
    assert source.error("bad", "conv1", "Convolution").location() == "v1.prototxt:7"


def test_source_map_without_upgrade_keeps_legacy_names():
    net, source = parse_net_text(V1_NET, "v1.prototxt", upgrade=False)
    assert len(net.layers) == 2 and len(net.layer) == 0
    assert source.layer_lines == {"conv1": 7, "relu1": 16}


def test_source_map_for_a_v0_net_drops_folded_padding():
    text = (
        'input: "data"\n'
        'layers {\n  layer { name: "pad1" type: "padding" pad: 2 }\n'
        '  bottom: "data" top: "pad1"\n}\n'
        'layers {\n  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 5 }\n'
        '  bottom: "pad1" top: "conv1"\n}\n'
    )
    net, source = parse_net_text(text, "v0.prototxt")
    assert [layer.name for layer in net.layer] == ["conv1"]
    assert list(net.layer[0].convolution_param.pad) == [2]
    assert source.layer_lines == {"conv1": 6}


def test_binary_round_trip(tmp_path):
    net, _ = parse_net_text(V1_NET, upgrade=False)
    path = tmp_path / "v1.binaryproto"
    write_binary(path, net)
    raw, source = read_net(path, upgrade=False)
    assert raw == net
    assert source.layer_lines == {}
    upgraded, _ = read_net(path)
    assert upgraded == parse_net_text(V1_NET)[0]


def test_corrupt_binary_is_one_line_error(tmp_path):
    path = tmp_path / "broken.caffemodel"
    path.write_bytes(b"\x0a\x05ab")  # a name field that claims 5 bytes but has 2
    with pytest.raises(CaffeAlexError) as info:
        read_net(path)
    message = str(info.value)
    assert str(path) in message and "binary" in message and "\n" not in message


def test_text_round_trip_and_atomic_write(tmp_path):
    net, _ = parse_net_text(SMALL_NET)
    path = tmp_path / "out.prototxt"
    write_text(path, net)
    assert path.read_text() == net_to_text(net)
    assert parse_net_text(path.read_text())[0] == net
    os.chmod(path, 0o640)
    write_text(path, net)  # replacing keeps the file's permissions
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.prototxt"]  # no temp file left behind


SOLVER = """\
net: "train_val.prototxt"
base_lr: 0.01
lr_policy: "step"
stepsize: 100
solver_type: NESTEROV
"""


def test_read_solver_text_and_binary(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text(SOLVER)
    solver = read_solver(path)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert not solver.HasField("snapshot_prefix")  # left as written
    assert read_solver(path, upgrade=False).solver_type == caffe_pb2.SolverParameter.NESTEROV
    binary = tmp_path / "solver.binaryproto"
    write_binary(binary, read_solver(path, upgrade=False))
    assert read_solver(binary) == solver
    assert 'type: "Nesterov"' in solver_to_text(solver)


def test_read_any_classifies(tmp_path):
    net_path, solver_path = tmp_path / "n.prototxt", tmp_path / "s.prototxt"
    net_path.write_text(V1_NET)
    solver_path.write_text(SOLVER)
    assert read_any(net_path)[0] == "net"
    assert read_any(solver_path)[0] == "solver"
    binary = tmp_path / "s.bin"
    write_binary(binary, read_solver(solver_path))
    assert read_any(binary)[0] == "solver"


def test_read_any_reports_the_error_that_got_further(tmp_path):
    path = tmp_path / "s.prototxt"
    path.write_text(SOLVER + "momentum: 0.9\nbogus_field: 1\n")
    with pytest.raises(CaffeAlexError, match=r"s.prototxt:7:1: unknown field \"bogus_field\""):
        read_any(path)


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "windows.prototxt"
    path.write_bytes(b"\xef\xbb\xbf" + SMALL_NET.replace("\n", "\r\n").encode())
    net, source = read_net(path)
    assert source.layer_lines["pool"] == 13
    assert net == parse_net_text(SMALL_NET)[0]
