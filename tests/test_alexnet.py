"""models/bvlc_alexnet: our definitions are layer-for-layer BVLC's, have the documented shapes,
and the deploy net gives OpenCV's numbers end to end (every blob of the forward)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.paths import ROOT
from tests.reference import opencv_forward, relative_error

OURS = ROOT / "models" / "bvlc_alexnet"
BVLC = ROOT.parent / "shared" / "corpus" / "BVLC__caffe" / "models" / "bvlc_alexnet"
INPUTS = {"data": (2, 3, 227, 227), "label": (2,)}


def read(path: Path, message):
    return text_format.Parse(path.read_text(), message)


def without_fillers(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    for layer in copy.layer:
        for field in ("convolution_param", "inner_product_param"):
            if layer.HasField(field):
                getattr(layer, field).ClearField("weight_filler")
                getattr(layer, field).ClearField("bias_filler")
    return copy


@pytest.mark.skipif(not BVLC.is_dir(), reason="../shared/corpus not present")
def test_same_definitions_as_bvlc():
    assert read(OURS / "train_val.prototxt", caffe_pb2.NetParameter()) == read(
        BVLC / "train_val.prototxt", caffe_pb2.NetParameter()
    )
    assert read(OURS / "solver.prototxt", caffe_pb2.SolverParameter()) == read(
        BVLC / "solver.prototxt", caffe_pb2.SolverParameter()
    )
    # BVLC's deploy file has no fillers (its weights come from a .caffemodel); ours keeps them
    ours = without_fillers(read(OURS / "deploy.prototxt", caffe_pb2.NetParameter()))
    assert ours == read(BVLC / "deploy.prototxt", caffe_pb2.NetParameter())


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


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_train_val_builds_in_both_phases(phase):
    net = Net.from_prototxt(str(OURS / "train_val.prototxt"), phase, input_shapes=INPUTS)
    assert net.input_names == ["data", "label"]
    wanted = ["loss"] if phase == "TRAIN" else ["accuracy", "loss"]
    assert net.output_names == wanted
    lrs = {(p.layer, p.index): (p.lr_mult, p.decay_mult) for p in net.learnable_params()}
    assert lrs[("conv1", 0)] == (1.0, 1.0) and lrs[("fc8", 1)] == (2.0, 0.0)


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
