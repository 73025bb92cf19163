"""DummyData: declared shapes (BlobShape or legacy dims), fillers, refill rules and device."""

from __future__ import annotations

import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import parse_net


def dummy_net(params: str, tops=("a",)) -> Net:
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    text = f"""name: "dummy"
layer {{ name: "dummy" type: "DummyData" {top_lines} dummy_data_param {{ {params} }} }}
"""
    return Net(parse_net(text))


SHAPES = [
    ("shape { dim: 2 dim: 3 }", ("a", "b"), [(2, 3), (2, 3)]),
    ("shape { dim: 2 } shape { dim: 1 dim: 4 dim: 5 }", ("a", "b"), [(2,), (1, 4, 5)]),
    ("num: 2 channels: 3 height: 4 width: 5", ("a",), [(2, 3, 4, 5)]),
    (
        "num: 2 num: 7 channels: 3 height: 4 width: 5 width: 1",
        ("a", "b"),
        [(2, 3, 4, 5), (7, 3, 4, 1)],
    ),
    ("shape { }", ("a",), [()]),
]


@pytest.mark.parametrize("params,tops,want", SHAPES)
def test_declared_shapes(params, tops, want):
    net = dummy_net(params, tops)
    assert [net.blob_shapes[t] for t in tops] == want
    assert net.input_names == []  # produced in forward, not fed
    out = net()
    assert [tuple(out[t].shape) for t in tops] == want
    assert all(torch.all(out[t] == 0) for t in tops)  # default filler: constant 0


@pytest.mark.parametrize(
    "params,tops,message",
    [
        ("shape { dim: 2 } shape { dim: 3 }", ("a", "b", "c"), "shape must be given once"),
        ("num: 2 channels: 3 height: 4", ("a",), "width must be given once"),
        ("num: 2 channels: 3 height: 4 width: 5 shape { dim: 1 }", ("a",), "both shape"),
        ("shape { dim: 1 } data_filler { } data_filler { }", ("a", "b", "c"), "data_filler"),
        ("shape { dim: 1 } data_filler { type: 'bogus' }", ("a",), "unknown filler type"),
        ("shape { dim: -1 }", ("a",), "negative"),
    ],
)
def test_config_errors_name_the_layer(params, tops, message):
    with pytest.raises(CaffeAlexError, match=f"layer 'dummy'.*{message}"):
        dummy_net(params, tops)


def test_constant_fillers_per_top_and_stable_values():
    net = dummy_net(
        "shape { dim: 2 dim: 2 } data_filler { type: 'constant' value: 3.5 } "
        "data_filler { type: 'constant' value: -1 }",
        ("a", "b"),
    )
    first = net()
    second = net()
    assert torch.all(first["a"] == 3.5) and torch.all(first["b"] == -1)
    assert torch.equal(first["a"], second["a"])


def test_gaussian_refills_every_forward():
    torch.manual_seed(0)
    net = dummy_net("shape { dim: 200 dim: 50 } data_filler { type: 'gaussian' mean: 2 std: 3 }")
    first, second = net()["a"], net()["a"]
    assert not torch.equal(first, second)
    assert abs(first.mean().item() - 2) < 0.1 and abs(first.std().item() - 3) < 0.1


def test_one_filler_for_all_tops_draws_each_top_separately():
    torch.manual_seed(0)
    net = dummy_net("shape { dim: 100 } data_filler { type: 'uniform' min: -2 max: 5 }", ("a", "b"))
    out = net()
    assert not torch.equal(out["a"], out["b"])
    for t in ("a", "b"):
        assert out[t].min() >= -2 and out[t].max() < 5


def test_host_fillers_and_dtype_follow_the_module():
    net = dummy_net("shape { dim: 4 dim: 3 } data_filler { type: 'xavier' }").double()
    out = net()["a"]
    assert out.dtype == torch.float64 and out.shape == (4, 3)
    assert out.abs().max() <= (3.0 / 3) ** 0.5  # xavier: uniform within sqrt(3 / fan_in)


@pytest.mark.gpu
def test_tops_are_made_on_the_module_device():
    net = dummy_net("shape { dim: 3 } data_filler { type: 'gaussian' }", ("a", "b")).cuda()
    out = net()
    assert out["a"].is_cuda and out["b"].is_cuda


def test_dummy_feeds_a_loss():
    text = """name: "dummy_loss"
layer { name: "d" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 2 dim: 3 }
    data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" }
"""
    net = Net(parse_net(text))
    net()
    assert net.loss.item() == pytest.approx(6 * 0.25 / 2 / 2)
