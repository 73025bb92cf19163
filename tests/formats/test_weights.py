"""Weights in and out: byte-identical round trips of AlexNet through every format, OpenCV
reading our .caffemodel files, legacy V1/V0 files, Caffe's copy rules and bad input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.caffemodel import read_caffemodel
from caffe_alex.formats.hdf5 import read_h5
from caffe_alex.formats.weights import convert
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.paths import ROOT
from tests.reference import parse_net, randomize

ALEXNET = str(ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt")


def digest(path) -> bytes:
    return Path(path).read_bytes()  # compared whole: faster than hashing 233 MB


@pytest.fixture(scope="module")
def alexnet(tmp_path_factory):
    """AlexNet with random weights saved once, and a second net to load files into. The files
    (~233 MB each) go to memory where the machine has /dev/shm: fsync to disk is the slow part."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        holder = tempfile.TemporaryDirectory(dir=shm)
        folder = Path(holder.name)
    else:
        holder, folder = None, tmp_path_factory.mktemp("alexnet")
    net = Net.from_prototxt(ALEXNET)
    randomize(net)  # the deploy file has no fillers: without this every blob would be 0
    net.save_weights(folder / "a.caffemodel")
    yield net, Net.from_prototxt(ALEXNET), folder
    if holder is not None:
        holder.cleanup()


def assert_same_params(a: Net, b: Net) -> None:
    for name, blobs in a.params.items():
        for x, y in zip(blobs, b.params[name]):
            assert torch.equal(x, y), name


def test_alexnet_caffemodel_round_trip_is_byte_identical(alexnet):
    net, fresh, folder = alexnet
    report = fresh.load_weights(str(folder / "a.caffemodel"))
    assert report.loaded == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert report.ignored == [] and report.missing == []
    assert_same_params(net, fresh)
    fresh.save_weights(folder / "b.caffemodel")
    assert digest(folder / "a.caffemodel") == digest(folder / "b.caffemodel")


def test_alexnet_h5_round_trip_is_byte_identical(alexnet):
    net, fresh, folder = alexnet
    net.save_weights(folder / "a.caffemodel.h5")
    with torch.no_grad():
        fresh.params["conv1"][0].zero_()
    fresh.load_weights([folder / "a.caffemodel.h5"])
    assert_same_params(net, fresh)
    fresh.save_weights(folder / "b.caffemodel.h5")
    assert digest(folder / "a.caffemodel.h5") == digest(folder / "b.caffemodel.h5")
    ws = read_h5(folder / "a.caffemodel.h5")
    assert [lw.name for lw in ws.layers][:3] == ["conv1", "conv2", "conv3"]  # HDF5 name order


def test_alexnet_torch_formats_round_trip(alexnet):
    net, fresh, folder = alexnet
    convert(folder / "a.caffemodel", folder / "c.pt")  # no --model needed either way
    convert(folder / "c.pt", folder / "c.safetensors")
    convert(folder / "c.safetensors", folder / "c.caffemodel")
    assert digest(folder / "c.caffemodel") == digest(folder / "a.caffemodel")


# ---- a small net: shared parameters, dotted names ------------------------------------------

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "conv1.1" type: "InnerProduct" bottom: "data" top: "a"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "conv1_1" type: "InnerProduct" bottom: "a" top: "b"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "b" top: "c"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
"""


def small(text: str = SMALL) -> Net:
    return Net(parse_net(text), "TEST")


def test_shared_blobs_h5_layout_and_load(tmp_path):
    import h5py

    net = small()
    net.save_weights(tmp_path / "s.h5", with_diffs=True)
    with h5py.File(tmp_path / "s.h5") as f:
        assert sorted(f["data"]) == ["conv1.1", "conv1_1", "data", "ip"]
        assert sorted(f["data/conv1.1"]) == ["0", "1"] and len(f["data/conv1_1"]) == 0
        assert sorted(f["diff/conv1_1"]) == ["0", "1"]  # diffs written for every blob
        np.testing.assert_array_equal(f["data/ip/0"][()], net.params["ip"][0].detach().numpy())
    other = small()
    other.load_weights(tmp_path / "s.h5")
    assert_same_params(net, other)
    assert other.params["conv1.1"][0] is other.params["conv1_1"][0]


def test_dotted_layer_names_keep_their_caffe_name(tmp_path):
    from safetensors import safe_open

    net = small()
    net.save_weights(tmp_path / "s.safetensors")
    with safe_open(tmp_path / "s.safetensors", framework="np") as f:
        assert "layers.conv1_1.blobs.0" in f.keys() and "layers.conv1_1_2.blobs.0" not in f.keys()
        assert '"layers.conv1_1.blobs.0": ["conv1.1", 0]' in f.metadata()["caffe_blobs"]
    convert(tmp_path / "s.safetensors", tmp_path / "s.caffemodel")
    names = [lw.name for lw in read_caffemodel(tmp_path / "s.caffemodel").layers]
    assert names == ["data", "conv1.1", "conv1_1", "ip"]
    other = small()
    other.load_weights(tmp_path / "s.caffemodel")
    assert_same_params(net, other)
    # a plain state dict (no side data) resolves module keys through the net
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    third = small()
    assert third.load_weights(tmp_path / "plain.pt").loaded == ["conv1.1", "conv1_1", "ip"]
    assert_same_params(net, third)


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".caffemodel.h5"])
def test_net_save_load_save_is_byte_identical(tmp_path, ext):
    net = small()
    net.save_weights(tmp_path / f"n{ext}")
    other = small()
    other.load_weights(tmp_path / f"n{ext}")
    assert_same_params(net, other)
    other.save_weights(tmp_path / f"m{ext}")
    assert digest(tmp_path / f"n{ext}") == digest(tmp_path / f"m{ext}")
    if ext == ".pt":  # the state dict loads into the module directly too
        saved = torch.load(tmp_path / f"n{ext}", weights_only=True)
        other.load_state_dict(saved["state_dict"])
        assert saved["caffe_blobs"]["layers.conv1_1_2.blobs.0"] == ["conv1_1", 0]
    net.save_weights(tmp_path / "n.caffemodel")
    (tmp_path / "net.prototxt").write_text(SMALL)
    model = str(tmp_path / "net.prototxt")
    convert(tmp_path / f"n{ext}", tmp_path / "c.caffemodel", net=Net.from_prototxt(model))
    assert digest(tmp_path / "c.caffemodel") == digest(tmp_path / "n.caffemodel")


def test_written_as_the_generated_classes_write_it(tmp_path):
    net = small()
    net.save_weights(tmp_path / "s.caffemodel", with_diffs=True)
    data = (tmp_path / "s.caffemodel").read_bytes()
    model = caffe_pb2.NetParameter.FromString(data)
    assert model.SerializeToString() == data
    assert model.name == "small" and [lp.phase for lp in model.layer] == [caffe_pb2.TEST] * 4
    blob = model.layer[3].blobs[0]
    assert list(blob.shape.dim) == [4, 3] and list(blob.diff) == [0] * 12
    np.testing.assert_array_equal(blob.data, net.params["ip"][0].detach().numpy().ravel())


def test_report_lists_ignored_and_missing_layers_and_files_load_in_order(tmp_path):
    net = small()
    net.save_weights(tmp_path / "s.caffemodel")
    renamed = SMALL.replace('name: "ip"', 'name: "ip_new"')
    other = small(renamed)
    report = other.load_weights(str(tmp_path / "s.caffemodel"))
    assert report.ignored == ["ip"] and report.missing == ["ip_new"]
    bias = other.params["ip_new"][1].clone()
    extra = small(renamed)
    with torch.no_grad():
        extra.params["conv1.1"][1].fill_(7)
    extra.save_weights(tmp_path / "t.caffemodel")
    report = other.load_weights(f"{tmp_path / 's.caffemodel'},{tmp_path / 't.caffemodel'}")
    assert torch.all(other.params["conv1_1"][1] == 7)  # the later file wins
    assert report.missing == [] and report.files[1].endswith("t.caffemodel")
    assert not torch.equal(bias, extra.params["ip_new"][1])


# ---- legacy files ---------------------------------------------------------------------------

V1 = caffe_pb2.V1LayerParameter


def legacy_blob(array: np.ndarray, dims) -> caffe_pb2.BlobProto:
    """A BlobProto as 2014 Caffe wrote it: num/channels/height/width, packed data."""
    blob = caffe_pb2.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
    raw = array.astype("<f4").tobytes()  # field 5, packed: parsed, not appended float by float
    n, length = len(raw), bytearray()
    while True:
        length.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            break
    blob.MergeFromString(b"\x2a" + bytes(length) + raw)
    return blob


def test_v1_caffemodel_loads_into_the_current_alexnet(alexnet, tmp_path):
    net, fresh, _ = alexnet
    model = caffe_pb2.NetParameter(name="CaffeNet")
    model.layers.add(name="data", type=V1.DATA, top=["data", "label"])
    for name, blobs in net.params.items():
        kind = V1.CONVOLUTION if name.startswith("conv") else V1.INNER_PRODUCT
        layer = model.layers.add(name=name, type=kind, blobs_lr=[1, 2], weight_decay=[1, 0])
        w, b = (p.detach().numpy() for p in blobs)
        dims = w.shape if w.ndim == 4 else (1, 1) + w.shape  # IP weights were 1x1xNxK
        layer.blobs.extend([legacy_blob(w, dims), legacy_blob(b, (1, 1, 1) + b.shape)])
    model.layers.add(name="loss", type=V1.SOFTMAX_LOSS, bottom=["fc8", "label"])
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(model.SerializeToString())
    del model
    assert read_caffemodel(path).version == "V1"
    with torch.no_grad():
        for blobs in fresh.params.values():
            blobs[0].zero_()
    report = fresh.load_weights(path)
    assert report.ignored == ["loss"] and report.missing == []
    assert_same_params(net, fresh)


def test_v0_caffemodel_with_double_data(tmp_path):
    net = small(SMALL.replace('param { name: "w" } param { name: "b" }', ""))
    model = caffe_pb2.NetParameter(name="old")
    rng = np.random.default_rng(1)
    values = {}
    for name, blobs in net.params.items():
        v0 = model.layers.add().layer
        v0.name, v0.type, v0.num_output = name, "innerproduct", blobs[0].shape[0]
        for blob in blobs:
            array = rng.standard_normal(tuple(blob.shape))
            dims = (1,) * (4 - array.ndim) + array.shape
            proto = v0.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
            proto.double_data.extend(array.ravel())
            values.setdefault(name, []).append(array)
    path = tmp_path / "v0.caffemodel"
    path.write_bytes(model.SerializeToString())
    ws = read_caffemodel(path)
    assert ws.version == "V0" and ws.layers[0].type == "InnerProduct"
    assert ws.layers[0].blobs[0].data.dtype == np.float64 and ws.layers[0].blobs[0].legacy
    net.load_weights(path)
    for name, arrays in values.items():
        for param, array in zip(net.params[name], arrays):
            np.testing.assert_array_equal(param.detach().numpy(), array.astype(np.float32))


# ---- bad input ------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    from caffe_alex.formats import wire

    small().save_weights(tmp_path / "s.caffemodel")
    data = (tmp_path / "s.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) - 10])
    with pytest.raises(CaffeAlexError) as info:
        small().load_weights(tmp_path / "cut.caffemodel")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cut.caffemodel'}: not a caffemodel (NetParameter): ")
    last = [(fs, e - s) for _, _, s, e, fs in wire.fields(data, 0, len(data))][-1]
    assert message.endswith(
        f"field 100 truncated ({last[1]} bytes declared, {last[1] - 10} remain) at byte {last[0]}"
    )
    assert "\n" not in message


def test_wrong_shape_names_layer_blob_shapes_and_files(tmp_path):
    small().save_weights(tmp_path / "s.caffemodel")
    other = small(SMALL.replace("num_output: 4", "num_output: 5"))
    with pytest.raises(CaffeAlexError) as info:
        other.load_weights(tmp_path / "s.caffemodel")
    assert str(info.value) == (
        f"cannot copy blob 0 of layer 'ip': shape [4, 3] in {tmp_path / 's.caffemodel'} but "
        "[5, 3] in the net (the net definition); to learn this layer from scratch instead, "
        "rename it"
    )
    fewer = small(SMALL.replace("bias_filler", "bias_term: false bias_filler"))
    with pytest.raises(CaffeAlexError, match="incompatible number of blobs for layer 'ip': 2 in"):
        fewer.load_weights(tmp_path / "s.caffemodel")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the NetParameter has no layers"),
        (b'name: "x"\nlayer { name: "a" }\n', "invalid wire type 6 at byte 0"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "at byte 0"),
        (b"\x08\x01", "field 1 (name) of wire type 0 at byte 0"),
        (b"\x0a\x01a\xd0\x02\x01", "unknown field 42 at byte 3"),  # a SolverParameter
    ],
)
def test_not_a_caffemodel(tmp_path, content, reason):
    path = tmp_path / "x.caffemodel"
    path.write_bytes(content)
    with pytest.raises(CaffeAlexError) as info:
        read_caffemodel(path)
    assert str(info.value).startswith(f"{path}: not a caffemodel") and reason in str(info.value)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    from caffe_alex.formats import caffemodel

    net = small()
    net.save_weights(tmp_path / "s.caffemodel")
    before = digest(tmp_path / "s.caffemodel")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caffemodel, "blob_pieces", boom)
    with pytest.raises(KeyboardInterrupt):
        net.save_weights(tmp_path / "s.caffemodel")
    assert digest(tmp_path / "s.caffemodel") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.caffemodel"]


# ---- mean files -----------------------------------------------------------------------------


def test_binaryproto_npy_round_trip(tmp_path):
    mean = np.random.default_rng(0).uniform(0, 255, (1, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "m.npy", mean)
    convert(tmp_path / "m.npy", tmp_path / "m.binaryproto")
    proto = caffe_pb2.BlobProto.FromString((tmp_path / "m.binaryproto").read_bytes())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 3, 4, 5)
    convert(tmp_path / "m.binaryproto", tmp_path / "back.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), mean)
    shaped = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3, 2]), data=range(6))
    (tmp_path / "s.binaryproto").write_bytes(shaped.SerializeToString())
    convert(tmp_path / "s.binaryproto", tmp_path / "s.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.arange(6.0).reshape(3, 2))
    np.save(tmp_path / "s2.npy", np.load(tmp_path / "s.npy"))
    convert(tmp_path / "s2.npy", tmp_path / "s2.binaryproto")
    assert (tmp_path / "s2.binaryproto").read_bytes() == shaped.SerializeToString()


# ---- command line ---------------------------------------------------------------------------


def test_cli_inspect_convert_and_time_with_weights(tmp_path):
    from click.testing import CliRunner

    from caffe_alex.cli import main

    small().save_weights(tmp_path / "s.caffemodel")
    (tmp_path / "net.prototxt").write_text(SMALL)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "s.caffemodel")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith('caffemodel, format version current, net "small", '
                             f"{(tmp_path / 's.caffemodel').stat().st_size:,} bytes")  # fmt: skip
    assert lines[7].split() == ["ip", "InnerProduct", "0", "4x3", "float32", "12"]
    assert lines[-1] == "total: 40 parameters in 6 blobs, 4 layers"
    result = runner.invoke(
        main, ["convert", str(tmp_path / "s.caffemodel"), str(tmp_path / "s.h5")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["convert", str(tmp_path / "s.h5"), str(tmp_path / "t.caffemodel")]
    )
    assert result.exit_code == 1
    assert "has no layer definitions; give the net definition (--model)" in result.output
    (tmp_path / "bad.caffemodel").write_bytes(b"\x89PNG\r\n\x1a\n")
    result = runner.invoke(main, ["inspect", str(tmp_path / "bad.caffemodel")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    args = ["time", "-model", str(tmp_path / "net.prototxt"), "-weights",
            str(tmp_path / "s.caffemodel"), "-iterations", "1", "-phase", "TEST"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output


DUPLICATE_NAMES = """
layer { name: "input" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "constant" } } }
layer { name: "conv" type: "Convolution" bottom: "a" top: "b"
        convolution_param { num_output: 2 kernel_size: 1
                            weight_filler { type: "constant" value: 2 } } }
"""


def test_a_reused_layer_name_builds_and_loads_as_caffe_does(tmp_path):
    """Published SSDLite files name two layers alike. Caffe builds them; CopyTrainedLayersFrom
    copies each record of that name into the FIRST layer so named (its search starts at 0), and
    pycaffe's net.params, a dict built in layer order, shows the last."""
    net = small(DUPLICATE_NAMES)
    assert net.layer_names == ["input", "conv", "conv"]
    record = caffe_pb2.NetParameter(name="dup")
    layer = record.layer.add(name="conv", type="Convolution")
    for values in (np.full((2, 2, 1, 1), 7.0), np.arange(2.0)):
        blob = layer.blobs.add(shape=caffe_pb2.BlobShape(dim=values.shape))
        blob.data.extend(values.ravel())
    path = tmp_path / "dup.caffemodel"
    path.write_bytes(record.SerializeToString())
    net.load_weights(str(path))
    first, second = (net.layers[key] for key in list(net.layers.keys())[1:])
    assert torch.equal(first.blobs[0], torch.full((2, 2, 1, 1), 7.0))
    assert torch.equal(second.blobs[0], torch.full((2, 2, 1, 1), 2.0))  # its filler
    assert net.params["conv"][0] is second.blobs[0]
