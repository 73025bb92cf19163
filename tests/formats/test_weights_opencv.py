"""OpenCV 4's Caffe importer reads the .caffemodel files caffe-alex writes and computes the
same outputs (AlexNet, CaffeNet, GoogLeNet, ResNet-50: BatchNorm + Scale + Eltwise)."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch

from caffe_alex.net import Net
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.reference import relative_error

NETS = {
    "alexnet": (ROOT / "models/bvlc_alexnet/deploy.prototxt", 227, ["fc8", "prob"]),
    "caffenet": (
        CORPUS / "BVLC__caffe/models/bvlc_reference_caffenet/deploy.prototxt",
        227,
        ["fc8", "prob"],
    ),
    "googlenet": (
        CORPUS / "BVLC__caffe/models/bvlc_googlenet/deploy.prototxt",
        224,
        ["loss3/classifier", "prob"],
    ),
    "resnet": (None, 32, ["fc", "prob"]),  # RESNET below: ResNet-50's blocks, 2 of them
}


CORPUS_NETS = ("caffenet", "googlenet")


def _conv_bn(name: str, bottom: str, out: int, kernel: int, stride: int, relu: bool) -> str:
    pad = kernel // 2
    text = f"""
layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  convolution_param {{ num_output: {out} kernel_size: {kernel} pad: {pad} stride: {stride}
                      bias_term: false }} }}
layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}"
  batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}"
  scale_param {{ bias_term: true }} }}
"""
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def _block(name: str, bottom: str, width: int, out: int, stride: int, project: bool) -> str:
    text = _conv_bn(f"res{name}_branch2a", bottom, width, 1, stride, True)
    text += _conv_bn(f"res{name}_branch2b", f"res{name}_branch2a", width, 3, 1, True)
    text += _conv_bn(f"res{name}_branch2c", f"res{name}_branch2b", out, 1, 1, False)
    shortcut = bottom
    if project:
        text += _conv_bn(f"res{name}_branch1", bottom, out, 1, stride, False)
        shortcut = f"res{name}_branch1"
    return (
        text
        + f"""
layer {{ name: "res{name}" type: "Eltwise" bottom: "{shortcut}" bottom: "res{name}_branch2c"
  top: "res{name}" }}
layer {{ name: "res{name}_relu" type: "ReLU" bottom: "res{name}" top: "res{name}" }}
"""
    )


RESNET = (
    'name: "ResNet-style"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 32 input_dim: 32\n'
    + _conv_bn("conv1", "data", 16, 7, 2, True)
    + _block("2a", "conv1", 8, 32, 1, True)
    + _block("2b", "res2a", 8, 32, 1, False)
    + """
layer { name: "pool5" type: "Pooling" bottom: "res2b" top: "pool5"
  pooling_param { pool: AVE kernel_size: 16 stride: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc"
  inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
)


def unit_scale(net: Net) -> None:
    """Random weights that keep activations of order 1 through any depth."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer_types[net.layer_names.index(name)]
            if kind == "BatchNorm":  # mean, variance, scale factor
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.1)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=gen) + 0.5)
                blobs[2].fill_(1)
            elif kind == "Scale":
                blobs[0].copy_(1 + torch.randn(blobs[0].shape, generator=gen) * 0.1)
                for b in blobs[1:]:
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            else:
                fan_in = math.prod(blobs[0].shape[1:])
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) / math.sqrt(fan_in))
                for b in blobs[1:]:
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        last = [n for n in net.params][-1]
        net.params[last][0].mul_(0.05)  # logits of order 1 for the softmax


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.corpus if n in CORPUS_NETS else pytest.mark.slow)
        if n != "resnet"
        else n
        for n in NETS
    ],
)
def test_opencv_reads_our_caffemodel(name, tmp_path):
    import cv2

    prototxt, size, outputs = NETS[name]
    if prototxt is None:
        prototxt = tmp_path / "resnet.prototxt"
        prototxt.write_text(RESNET)
    net = Net.from_prototxt(str(prototxt), input_shapes={"data": (1, 3, size, size)})
    unit_scale(net)
    data = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        net(torch.from_numpy(data))
    ours = {n: net.blobs[n].numpy() for n in outputs}
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        path = os.path.join(tmp, "w.caffemodel")
        net.save_weights(path)
        del net
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), path)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setInput(data, "data")
    theirs = dict(zip(outputs, cv_net.forward(outputs)))
    errors = {n: relative_error(ours[n], theirs[n]) for n in outputs}
    assert max(errors.values()) <= 1e-5, errors
    assert np.abs(ours[outputs[0]]).max() > 0.1  # the logits are not vanishingly small
