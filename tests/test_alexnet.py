"""models/bvlc_alexnet: our definitions are layer-for-layer BVLC's (the deploy net also against
BVLC's definition written here as facts, so it holds without the corpus), have the documented
shapes, and the deploy net gives OpenCV's numbers end to end (every blob of the forward)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.reference import opencv_forward, relative_error

OURS = ROOT / "models" / "bvlc_alexnet"
BVLC = CORPUS / "BVLC__caffe" / "models" / "bvlc_alexnet"
INPUTS = {"data": (2, 3, 227, 227), "label": (2,)}


def read(path: Path, message):
    return text_format.Parse(path.read_text(), message)


def _layer(name: str, kind: str, bottom: str | None, top: str, **params):
    layer = caffe_pb2.LayerParameter(name=name, type=kind, top=[top])
    if bottom is not None:
        layer.bottom.append(bottom)
    for field, values in params.items():
        getattr(layer, field).MergeFrom(type(getattr(layer, field))(**values))
    return layer


def _learned(name, kind, bottom, field, **values):
    layer = _layer(name, kind, bottom, name, **{field: values})
    layer.param.add(lr_mult=1, decay_mult=1)  # weights
    layer.param.add(lr_mult=2, decay_mult=0)  # biases
    return layer


def _conv(name, bottom, n, kernel, stride=None, pad=None, group=None):
    values = {"num_output": n, "kernel_size": [kernel], "stride": [stride] if stride else []}
    values |= {"pad": [pad] if pad else []} | ({"group": group} if group else {})
    return _learned(name, "Convolution", bottom, "convolution_param", **values)


def _relu(name, blob):
    return _layer(name, "ReLU", blob, blob)


def _lrn(name, bottom):
    lrn = {"local_size": 5, "alpha": 1e-4, "beta": 0.75}
    return _layer(name, "LRN", bottom, name, lrn_param=lrn)


def _pool(name, bottom):
    pool = {"pool": caffe_pb2.PoolingParameter.MAX, "kernel_size": 3, "stride": 2}
    return _layer(name, "Pooling", bottom, name, pooling_param=pool)


def _fc(name, bottom, n):
    return _learned(name, "InnerProduct", bottom, "inner_product_param", num_output=n)


def _drop(name, blob):
    return _layer(name, "Dropout", blob, blob, dropout_param={"dropout_ratio": 0.5})


def bvlc_deploy() -> caffe_pb2.NetParameter:
    """BVLC's models/bvlc_alexnet/deploy.prototxt, message for message: no fillers (its weights
    come from the trained .caffemodel), 10 x 3 x 227 x 227 input, softmax output."""
    shape = {"shape": [{"dim": [10, 3, 227, 227]}]}
    data = _layer("data", "Input", None, "data", input_param=shape)
    layers = [
        data,
        _conv("conv1", "data", 96, 11, stride=4), _relu("relu1", "conv1"), _lrn("norm1", "conv1"),
        _pool("pool1", "norm1"),
        _conv("conv2", "pool1", 256, 5, pad=2, group=2), _relu("relu2", "conv2"),
        _lrn("norm2", "conv2"), _pool("pool2", "norm2"),
        _conv("conv3", "pool2", 384, 3, pad=1), _relu("relu3", "conv3"),
        _conv("conv4", "conv3", 384, 3, pad=1, group=2), _relu("relu4", "conv4"),
        _conv("conv5", "conv4", 256, 3, pad=1, group=2), _relu("relu5", "conv5"),
        _pool("pool5", "conv5"),
        _fc("fc6", "pool5", 4096), _relu("relu6", "fc6"), _drop("drop6", "fc6"),
        _fc("fc7", "fc6", 4096), _relu("relu7", "fc7"), _drop("drop7", "fc7"),
        _fc("fc8", "fc7", 1000),
        _layer("prob", "Softmax", "fc8", "prob"),
    ]  # fmt: skip
    return caffe_pb2.NetParameter(name="AlexNet", layer=layers)


def test_deploy_is_bvlcs_message_field_for_field():
    ours = read(OURS / "deploy.prototxt", caffe_pb2.NetParameter())
    expected = bvlc_deploy()
    assert [layer.name for layer in ours.layer] == [layer.name for layer in expected.layer]
    for mine, theirs in zip(ours.layer, expected.layer):
        assert mine == theirs, mine.name
    assert ours == expected
    for layer in ours.layer:  # the fillers BVLC's deploy file does not have
        for field in ("convolution_param", "inner_product_param"):
            params = getattr(layer, field)
            assert not params.HasField("weight_filler") and not params.HasField("bias_filler")


def test_deploy_built_without_weights_has_zero_blobs():
    net = Net.from_prototxt(str(OURS / "deploy.prototxt"))
    assert all(not blob.any() for blobs in net.params.values() for blob in blobs)


@pytest.mark.corpus
def test_same_definitions_as_bvlc():
    assert read(OURS / "train_val.prototxt", caffe_pb2.NetParameter()) == read(
        BVLC / "train_val.prototxt", caffe_pb2.NetParameter()
    )
    assert read(OURS / "solver.prototxt", caffe_pb2.SolverParameter()) == read(
        BVLC / "solver.prototxt", caffe_pb2.SolverParameter()
    )
    ours = read(OURS / "deploy.prototxt", caffe_pb2.NetParameter())
    theirs = read(BVLC / "deploy.prototxt", caffe_pb2.NetParameter())
    assert ours == theirs
    assert theirs == bvlc_deploy()  # the facts above are BVLC's file


def test_deploy_shapes_and_parameter_count():
    net = Net.from_prototxt(str(OURS / "deploy.prototxt"))
    expected = {
        "data": (10, 3, 227, 227), "conv1": (10, 96, 55, 55), "norm1": (10, 96, 55, 55),
        "pool1": (10, 96, 27, 27), "conv2": (10, 256, 27, 27), "pool2": (10, 256, 13, 13),
        "conv3": (10, 384, 13, 13), "conv4": (10, 384, 13, 13), "conv5": (10, 256, 13, 13),
        "pool5": (10, 256, 6, 6), "fc6": (10, 4096), "fc7": (10, 4096), "fc8": (10, 1000),
        "prob": (10, 1000),
    }  # fmt: skip
    assert {k: net.blob_shapes[k] for k in expected} == expected
    assert net.params["conv2"][0].shape == (256, 48, 5, 5)  # two groups of 48 input channels
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
    assert net.output_names == ["prob"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_train_val_builds_in_both_phases(phase):
    net = Net.from_prototxt(str(OURS / "train_val.prototxt"), phase, input_shapes=INPUTS)
    assert net.input_names == ["data", "label"]
    wanted = ["loss"] if phase == "TRAIN" else ["accuracy", "loss"]
    assert net.output_names == wanted
    lrs = {(p.layer, p.index): (p.lr_mult, p.decay_mult) for p in net.learnable_params()}
    assert lrs[("conv1", 0)] == (1.0, 1.0) and lrs[("fc8", 1)] == (2.0, 0.0)


@pytest.mark.slow  # the whole AlexNet through OpenCV, blob by blob
def test_deploy_forward_matches_opencv_blob_by_blob():
    text = (OURS / "deploy.prototxt").read_text()
    net = Net.from_prototxt(str(OURS / "deploy.prototxt"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of unit-scale activations, so every layer matters
        for blobs in net.params.values():
            fan_in = math.prod(blobs[0].shape[1:])
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) / math.sqrt(fan_in))
            blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)
        net.params["fc8"][0].mul_(
            0.05
        )  # logits of order 1: softmax then adds no rounding of its own
    data = np.random.default_rng(0).standard_normal((10, 3, 227, 227)).astype(np.float32) * 50
    with torch.no_grad():
        net(torch.from_numpy(data))
    # OpenCV names outputs by layer: an in-place ReLU's output is our blob after that layer
    blob_of = {"relu1": "conv1", "norm1": "norm1", "pool1": "pool1", "relu2": "conv2",
               "norm2": "norm2", "pool2": "pool2", "relu3": "conv3", "relu4": "conv4",
               "relu5": "conv5", "pool5": "pool5", "drop6": "fc6", "drop7": "fc7", "fc8": "fc8",
               "prob": "prob"}  # fmt: skip
    theirs = opencv_forward(text, net, {"data": data}, list(blob_of))
    errors = {n: relative_error(net.blobs[b].numpy(), theirs[n]) for n, b in blob_of.items()}
    assert max(errors.values()) <= 1e-5, errors
