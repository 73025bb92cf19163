"""The module moves between devices, makes no host syncs in forward (it runs on the meta
device, where any read of a value fails), and works with channels_last, autocast and
torch.compile."""

from __future__ import annotations

import pytest
import torch

from caffe_alex.net import Net
from tests.reference import parse_net, randomize

MIXED_NET = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 4 dim: 13 dim: 13 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 group: 2 pad: 1
                            weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "norm1" top: "pool2"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "pool1" top: "sum" }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "pool1" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def make_net(phase="TEST") -> Net:
    net = Net(parse_net(MIXED_NET), phase)
    randomize(net, seed=1)
    return net


def inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return {
        "data": torch.randn(4, 4, 13, 13, generator=gen).to(device),
        "label": torch.tensor([0.0, 1, 2, 4]).to(device),
    }


def test_forward_on_meta_device_needs_no_values():
    net = make_net("TRAIN").to("meta")
    out = net(**inputs("meta"))
    assert out["prob"].device.type == "meta" and out["prob"].shape == (4, 5)
    assert net.loss.device.type == "meta"


def test_channels_last_input_gives_the_same_numbers():
    net = make_net()
    expected = net(**inputs())
    feed = inputs()
    feed["data"] = feed["data"].contiguous(memory_format=torch.channels_last)
    net_cl = make_net().to(memory_format=torch.channels_last)
    got = net_cl(**feed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_autocast_bf16_runs_close_to_float32():
    net = make_net()
    expected = net(**inputs())["prob"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(**inputs())["prob"]
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.05)


@pytest.mark.slow  # compiling takes seconds
def test_torch_compile_matches_eager_forward_and_backward():
    net = make_net()
    feed = inputs()
    expected = net(**feed)
    net.loss.backward()
    eager_grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager")
    got = compiled(**feed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    net.loss.backward()
    compiled_grads = [p.grad for p in net.parameters() if p.grad is not None]
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    net = make_net()
    expected = net(**inputs())
    got = net.to("cuda")(**inputs("cuda"))
    for name in expected:
        torch.testing.assert_close(got[name].cpu(), expected[name], rtol=1e-4, atol=1e-5)


# Fork nets (docs/forks.md) on CUDA equal their CPU forward: every fork layer type's forward is
# torch ops only. Run by benchmarks/gpu_check.py (pytest -k cuda) when a GPU is lent.
FORK_NETS_ON_CUDA = {
    "chuanqi305__MobileNet-SSD/deploy.prototxt": {"data": (1, 3, 300, 300)},
    "chuanqi305__MobileNetv2-SSDLite/ssdlite/voc/deploy.prototxt": {"data": (1, 3, 300, 300)},
    "farmingyard__ShuffleNet/shufflenet_v2_1x_deploy.prototxt": {"data": (2, 3, 224, 224)},
    "hujie-frank__SENet/models/SE-ResNet-50.prototxt": {"data": (1, 3, 224, 224)},
    "alexgkendall__SegNet-Tutorial/Models/segnet_basic_inference.prototxt": {
        "data": (1, 3, 24, 32),  # SegNet's pad_out_h wants an odd H/8
        "label": (1, 1, 24, 32),
    },
    "gklz1982__caffe-yolov2/examples/indoor/eval_detection/deploy.prototxt": {
        "data": (1, 3, 64, 64)
    },
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FORK_NETS_ON_CUDA))
def test_fork_net_forward_on_cuda_equals_cpu(name):
    from tests.paths import ROOT

    shapes = FORK_NETS_ON_CUDA[name]
    net = Net.from_prototxt(str(ROOT / "tests" / "fork_nets" / name), input_shapes=shapes)
    randomize(net, seed=3)
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.rand(v, generator=gen) for k, v in shapes.items()}
    with torch.no_grad():
        cpu = net(**inputs)
        gpu = net.to("cuda")(**{k: v.cuda() for k, v in inputs.items()})
    for blob, value in cpu.items():
        scale = max(float(value.abs().max()), 1e-6)
        assert float((gpu[blob].cpu() - value).abs().max()) <= 1e-3 * scale, blob
