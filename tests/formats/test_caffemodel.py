"""Caffemodels and mean files at the edges: layer names that are not UTF-8 (Caffe takes any
bytes: they are kept, and shown as escapes), and blob shapes Caffe's Blob would refuse."""

from __future__ import annotations

import numpy as np
import numpy.lib.format as npy_format
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.caffemodel import read_binaryproto, read_caffemodel
from caffe_alex.formats.weights import convert, read_weights
from caffe_alex.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter


def blob(shape, values) -> caffe_pb2.BlobProto:
    proto = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=shape))
    proto.data.extend(values)
    return proto


def model_bytes(odd: bytes = b"\xff\xfe") -> bytes:
    """A two-layer caffemodel whose second layer's name, and the net's, hold ``odd``."""
    net = caffe_pb2.NetParameter(name="netQQ")
    a = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    a.blobs.extend([blob([2, 3], range(6)), blob([2], [7, 8])])
    b = net.layer.add(name="fcQQ", type="InnerProduct", bottom=["ip"], top=["fcQQ"])
    b.blobs.extend([blob([1, 2], [1, 2])])
    return net.SerializeToString().replace(b"QQ", odd)


def test_names_that_are_not_utf8_are_kept_and_shown_escaped(tmp_path):
    src = tmp_path / "odd.caffemodel"
    src.write_bytes(model_bytes())
    ws = read_caffemodel(src)
    assert [lw.name for lw in ws.layers] == ["ip", "fc\udcff\udcfe"]
    assert ws.net_name == "net\udcff\udcfe"
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
    assert 'net "net\\xff\\xfe"' in result.output
    assert result.output.splitlines()[4].split() == ["fc\\xff\\xfe", "InnerProduct", "0", "1x2",
                                                     "float32", "2"]  # fmt: skip
    # every format keeps the bytes: back to a caffemodel, the file is the same
    for ext in ("caffemodel", "pt", "safetensors"):
        convert(src, tmp_path / f"a.{ext}")
        convert(tmp_path / f"a.{ext}", tmp_path / f"back_{ext}.caffemodel")
        assert (tmp_path / f"back_{ext}.caffemodel").read_bytes() == src.read_bytes(), ext
    convert(src, tmp_path / "a.caffemodel.h5")
    names = [lw.name for lw in read_weights(tmp_path / "a.caffemodel.h5").layers]
    assert sorted(names) == ["fc\udcff\udcfe", "ip"]


def test_legacy_records_with_names_that_are_not_utf8_read_as_escapes(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layers.add(name="cQQ", type=V1.INNER_PRODUCT, bottom=["dQQ"], top=["cQQ"])
    layer.blobs.extend([blob([2], [1, 2])])
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(net.SerializeToString().replace(b"QQ", b"\xff\xfe"))  # same length
    (lw,) = read_caffemodel(path).layers
    assert (lw.name, lw.type) == ("c\\xff\\xfe", "InnerProduct")
    assert lw.param.bottom[0] == "d\\xff\\xfe"
    assert lw.blobs[0].data.tolist() == [1, 2]


def _with_blob(proto: caffe_pb2.BlobProto) -> bytes:
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="ip", type="InnerProduct").blobs.extend([proto])
    return net.SerializeToString()


def _legacy(num, channels, height, width, values):
    proto = caffe_pb2.BlobProto(num=num, channels=channels, height=height, width=width)
    proto.data.extend(values)
    return proto


BAD_BLOBS = [
    (_legacy(-1, -2, 1, 1, [1, 2]), "blob of shape [-1, -2, 1, 1]: dimension -1 out of range"),
    (blob([-1, -2], [1, 2]), "dimension -1 out of range"),
    (blob([2**32, 2**32], []), "dimension 4294967296 out of range"),  # count wraps in int64
    (blob([2**16, 2**16], []), "exceeds 2147483647 values"),
    (blob([1] * 33, [1]), "blob of 33 axes (at most 32)"),
    (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2]), data=[1, 2], diff=[1]),
     "blob of shape [2] holds 1 diff values"),
]  # fmt: skip


@pytest.mark.parametrize(("proto", "reason"), BAD_BLOBS)
def test_blob_shapes_are_checked_as_caffes_blob_does(tmp_path, proto, reason):
    path = tmp_path / "w.caffemodel"
    path.write_bytes(_with_blob(proto))
    with pytest.raises(CaffeAlexError, match=f"^{path}: not a caffemodel"):
        read_caffemodel(path)
    with pytest.raises(CaffeAlexError) as info:
        read_caffemodel(path)
    assert reason in str(info.value)
    mean = tmp_path / "m.binaryproto"
    mean.write_bytes(proto.SerializeToString())
    with pytest.raises(CaffeAlexError, match=f"^{mean}: not a BlobProto file"):
        read_binaryproto(mean)


def _npy_header(path, shape, descr="<f4", extra=16):
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(
            f, {"descr": descr, "fortran_order": False, "shape": shape}
        )
        f.truncate(f.tell() + extra)  # zeros, stored sparse


NPY = [  # (how the .npy file is made, what the error says)
    (lambda p: np.save(p, np.array(["a", "b"])), "holds <U1 values, not numbers"),
    (lambda p: np.save(p, np.ones(2, np.complex64)), "holds complex64 values, not numbers"),
    (lambda p: np.save(p, np.array([{}, 1], dtype=object)), "not a readable .npy file"),
    (lambda p: np.save(p, np.zeros((0, 3), np.float32)), "holds no values"),
    (lambda p: _npy_header(p, (2**40,)), "not a readable .npy file"),  # nothing allocated
    (lambda p: _npy_header(p, (2**16, 2**16), extra=2**20), "not a readable .npy file"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + bytes(3)), "not a readable .npy file"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(30)), "not a readable .npy file"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), NPY)
def test_npy_to_binaryproto_checks_the_array(tmp_path, build, reason):
    src = tmp_path / "m.npy"
    build(src)
    (tmp_path / "m.binaryproto").write_bytes(b"old")
    with pytest.raises(CaffeAlexError) as info:
        convert(src, tmp_path / "m.binaryproto")
    text = str(info.value)
    assert text.startswith(f"{src}: ") and reason in text and "\n" not in text
    assert (tmp_path / "m.binaryproto").read_bytes() == b"old"


def test_npy_with_too_many_values_for_a_blob(tmp_path):
    src = tmp_path / "m.npy"
    _npy_header(src, (2**16, 2**15 + 1), descr="|u1", extra=2**31 + 2**16)  # sparse file
    with pytest.raises(CaffeAlexError, match="exceeds 2147483647 values"):
        convert(src, tmp_path / "m.binaryproto")
