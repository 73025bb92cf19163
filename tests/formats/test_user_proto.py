"""--proto: a fork caffe-alex does not ship, read with the user's own caffe.proto."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats import user_proto
from caffe_alex.formats.prototxt import read_net

# A fork's proto as a user would hold it: its own package, interp_param at 143 (BVLC's
# input_param), and a field of its own that caffe-alex has no name for.
FORK_PROTO = """
syntax = "proto2";
package myfork;
message BlobShape { repeated int64 dim = 1 [packed = true]; }
message InterpParameter {
  optional int32 height = 1 [default = 0];
  optional int32 width = 2 [default = 0];
}
message WarpParameter { optional float strength = 1; }
message LayerParameter {
  optional string name = 1;
  optional string type = 2;
  repeated string bottom = 3;
  repeated string top = 4;
  optional InterpParameter interp_param = 143;
  optional WarpParameter warp_param = 777;
}
message NetParameter {
  optional string name = 1;
  repeated string input = 3;
  repeated BlobShape input_shape = 8;
  repeated LayerParameter layer = 100;
}
"""


@pytest.fixture
def fork(tmp_path):
    path = tmp_path / "myfork.proto"
    path.write_text(FORK_PROTO)
    yield user_proto.load_proto(str(path))
    user_proto.use_proto(None)


def _binary_net(schema, *, warp: bool = False) -> bytes:
    net = schema.net(name="seg", input=["data"])
    net.input_shape.add(dim=[1, 3, 9, 9])
    layer = net.layer.add(name="up", type="Interp", bottom=["data"], top=["up"])
    layer.interp_param.height = 17
    layer.interp_param.width = 13
    if warp:
        layer.warp_param.strength = 2
    return net.SerializeToString()


@pytest.mark.subprocess  # the fork fixture runs protoc
def test_binary_net_read_with_the_forks_numbers(tmp_path, fork):
    path = tmp_path / "net.binaryproto"
    path.write_bytes(_binary_net(fork))
    user_proto.use_proto(fork.path)
    net, _ = read_net(str(path))
    layer = next(lp for lp in net.layer if lp.name == "up")
    assert (layer.interp_param.height, layer.interp_param.width) == (17, 13)
    assert not layer.HasField("input_param")
    user_proto.use_proto(None)  # our own schema takes 143 as input_param: not the fork's meaning
    net, _ = read_net(str(path))
    layer = next(lp for lp in net.layer if lp.name == "up")
    assert not layer.HasField("interp_param")


@pytest.mark.subprocess  # the fork fixture runs protoc
def test_a_field_we_cannot_name_is_one_error(tmp_path, fork):
    path = tmp_path / "net.binaryproto"
    path.write_bytes(_binary_net(fork, warp=True))
    user_proto.use_proto(fork.path)
    with pytest.raises(CaffeAlexError, match=r"layer 'up': field warp_param of myfork.proto has"):
        read_net(str(path))


@pytest.mark.subprocess  # the fork fixture runs protoc
def test_cli_option_and_its_errors(tmp_path, fork):
    path = tmp_path / "net.binaryproto"
    path.write_bytes(_binary_net(fork))
    out = CliRunner().invoke(main, ["--proto", fork.path, "summary", str(path)])
    assert out.exit_code == 0, out.output
    assert "up" in out.output and "Interp" in out.output
    bad = tmp_path / "broken.proto"
    bad.write_text("message { oops")
    out = CliRunner().invoke(main, ["--proto", str(bad), "layers"])
    assert out.exit_code == 1
    assert out.output.startswith(f"caffe-alex: error: {bad}: protoc refused it:")
    out = CliRunner().invoke(main, ["--proto", str(tmp_path / "nope.proto"), "layers"])
    assert out.exit_code == 1 and "nope.proto" in out.output


def test_protoc_missing_names_the_package(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_grpc(name, *args, **kwargs):
        if name == "grpc_tools":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_grpc)
    path = tmp_path / "f.proto"
    path.write_text(FORK_PROTO)
    with pytest.raises(CaffeAlexError, match=r"needs protoc: pip install 'caffe-alex\[proto\]'"):
        user_proto.load_proto(str(path))


def test_text_is_read_by_name_without_any_proto(tmp_path):
    # the same fork's text needs no --proto: interp_param is a name caffe-alex knows
    path = tmp_path / "net.prototxt"
    path.write_text(
        'input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
        'layer { name: "up" type: "Interp" bottom: "data" top: "up"\n'
        "        interp_param { height: 17 width: 13 } }\n"
    )
    net, _ = read_net(str(path))
    assert net.layer[-1].interp_param.height == 17


