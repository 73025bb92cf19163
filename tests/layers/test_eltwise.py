"""Eltwise against OpenCV 4 and Caffe's MAX scan (eltwise_layer.cpp) for gradient routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net


def eltwise_net(params: str, shapes) -> str:
    names = [f"b{i}" for i in range(len(shapes))]
    tops = " ".join(f'top: "{n}"' for n in names)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes)
    bottoms = " ".join(f'bottom: "{n}"' for n in names)
    return f"""
layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}
layer {{ name: "y" type: "Eltwise" {bottoms} top: "y" eltwise_param {{ {params} }} }}
"""


@pytest.mark.parametrize(
    "params, n",
    [
        ("", 2),
        ("coeff: 0.5 coeff: -2 coeff: 3", 3),
        ("operation: SUM coeff: 1 coeff: -1", 2),
        ("operation: PROD", 3),
        ("operation: PROD stable_prod_grad: false", 2),
        ("operation: MAX", 2),
        ("operation: MAX", 4),
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3)])
def test_matches_opencv(params, n, shape):
    compare_with_opencv(eltwise_net(params, [shape] * n))


def caffe_max_routing(bottoms):
    """Which bottom Caffe's forward records as the maximum, element by element."""
    a, b = bottoms[0], bottoms[1]
    top, mask = np.where(a > b, a, b), np.where(a > b, 0, 1)
    for i, c in enumerate(bottoms[2:], start=2):
        mask = np.where(c > top, i, mask)
        top = np.maximum(top, c)
    return top, mask


@pytest.mark.parametrize("n", [2, 3, 4])
def test_max_ties_route_the_gradient_like_caffe(n):
    rng = np.random.default_rng(n)
    # Few distinct values: many ties between bottoms, including between 0 and 1.
    values = [rng.integers(0, 3, size=(3, 4)).astype(np.float32) for _ in range(n)]
    net = Net(parse_net(eltwise_net("operation: MAX", [(3, 4)] * n)), "TEST")
    inputs = {f"b{i}": torch.tensor(v, requires_grad=True) for i, v in enumerate(values)}
    y = net(**inputs)["y"]
    dy = torch.arange(1.0, 13.0).reshape(3, 4)
    y.backward(dy)
    top, mask = caffe_max_routing(values)
    np.testing.assert_array_equal(y.detach().numpy(), top)
    for i in range(n):
        want = np.where(mask == i, dy.numpy(), 0)
        np.testing.assert_array_equal(inputs[f"b{i}"].grad.numpy(), want)


@pytest.mark.parametrize(
    "params", ["coeff: 0.5 coeff: -2 coeff: 3", "operation: PROD", "operation: MAX"]
)
def test_gradcheck(params):
    # Random normal inputs: MAX has no ties, so the finite differences are well defined.
    gradcheck_net(eltwise_net(params, [(2, 3, 2)] * 3))


def test_gradcheck_prod_two_bottoms():
    gradcheck_net(eltwise_net("operation: PROD stable_prod_grad: false", [(3, 2)] * 2))


@pytest.mark.parametrize(
    "params, shapes, message",
    [
        ("", [(2, 3), (2, 3), (3, 2)], r"bottom 0 is \[2, 3\], bottom 2 is \[3, 2\]"),
        ("operation: MAX", [(2, 3, 4), (2, 3)], r"bottom 0 is \[2, 3, 4\], bottom 1 is \[2, 3\]"),
        ("coeff: 1", [(2, 3), (2, 3)], "1 coeff values for 2 bottoms"),
        ("operation: PROD coeff: 1 coeff: 2", [(2, 3), (2, 3)], "only allowed with operation SUM"),
        ("", [(2, 3)], "at least 2 bottom"),
    ],
)
def test_errors(params, shapes, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(eltwise_net(params, shapes)), "TEST")


def test_shape_mismatch_after_reshape():
    net = Net(parse_net(eltwise_net("", [(2, 3), (2, 3)])), "TEST")
    with pytest.raises(CaffeAlexError, match=r"bottom 1 is \[2, 4\]"):
        net(b0=torch.zeros(2, 3), b1=torch.zeros(2, 4))
