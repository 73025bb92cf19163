"""Flatten, Reshape and Crop against OpenCV 4 and NumPy (flatten/reshape/crop_layer.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net


def make_net(shapes: dict, body: str) -> str:
    tops = " ".join(f'top: "{n}"' for n in shapes)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    return f'layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}\n{body}\n'


def flatten(params: str = "") -> str:
    return (
        f'layer {{ name: "y" type: "Flatten" bottom: "x" top: "y" flatten_param {{ {params} }} }}'
    )


def reshape(dims, params: str = "") -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return (
        f'layer {{ name: "y" type: "Reshape" bottom: "x" top: "y" '
        f"reshape_param {{ shape {{ {shape} }} {params} }} }}"
    )


def crop(params: str = "") -> str:
    return (
        f'layer {{ name: "y" type: "Crop" bottom: "x" bottom: "r" top: "y" '
        f"crop_param {{ {params} }} }}"
    )


def top_shape(text: str) -> tuple:
    return Net(parse_net(text), "TEST").blob_shapes["y"]


X = (2, 6, 4, 5)


@pytest.mark.parametrize(
    "params, shape",
    [
        ("", (2, 120)),
        ("axis: 1 end_axis: 2", (2, 24, 5)),
        ("axis: 2", (2, 6, 20)),
        ("axis: -3 end_axis: -2", (2, 24, 5)),
    ],
)
def test_flatten_matches_opencv(params, shape):
    text = make_net({"x": X}, flatten(params))
    assert top_shape(text) == shape
    compare_with_opencv(text)


@pytest.mark.parametrize(
    "params, shape",
    # OpenCV returns 1-D blobs as (n, 1); Caffe's flattening of every axis is 1-D.
    [("axis: 0", (240,)), ("axis: 3", X), ("axis: 1 end_axis: 0", (2, 1, 6, 4, 5))],
)
def test_flatten_shapes(params, shape):
    assert top_shape(make_net({"x": X}, flatten(params))) == shape


@pytest.mark.parametrize(
    "dims, params, shape",
    [
        ((0, -1, 2), "", (2, 60, 2)),
        ((-1,), "", (240,)),
        ((0, 0, -1), "", (2, 6, 20)),
        ((3, -1), "axis: 1 num_axes: 2", (2, 3, 8, 5)),
        ((4, 0), "axis: 0 num_axes: 1", None),
    ],
)
def test_reshape_matches_opencv(dims, params, shape):
    text = make_net({"x": X}, reshape(dims, params))
    if shape is None:
        with pytest.raises(CaffeAlexError):
            top_shape(text)
        return
    assert top_shape(text) == shape
    if len(shape) > 1:
        compare_with_opencv(text)


@pytest.mark.parametrize(
    "dims, params, shape",
    [
        ((1, 1), "axis: -1", (2, 6, 4, 5, 1, 1)),  # -1 = after the last axis
        ((1,), "axis: -2 num_axes: 0", (2, 6, 4, 1, 5)),
        ((-1,), "axis: 1 num_axes: -1", (2, 120)),
        ((0, 2, -1), "axis: 1", (2, 6, 2, 10)),  # 0 copies bottom axis 1 + 0
        ((), "axis: 1 num_axes: 0", X),
        ((1, 2), "axis: 0 num_axes: 1", (1, 2, 6, 4, 5)),
    ],
)
def test_reshape_axis_and_num_axes(dims, params, shape):
    text = make_net({"x": X}, reshape(dims, params))
    assert top_shape(text) == shape
    x = np.arange(240, dtype=np.float32).reshape(X)
    y = Net(parse_net(text), "TEST")(x=torch.from_numpy(x))["y"]
    np.testing.assert_array_equal(y.numpy(), x.reshape(shape))


@pytest.mark.parametrize(
    "shapes, params",
    [
        ({"x": (2, 3, 6, 7), "r": (2, 3, 4, 3)}, "offset: 1 offset: 2"),
        ({"x": (2, 3, 6, 7), "r": (2, 3, 4, 3)}, ""),
        ({"x": (2, 3, 6, 7), "r": (1, 2, 4, 3)}, "axis: 1 offset: 1"),
        ({"x": (2, 3, 6, 7), "r": (1, 2, 4, 7)}, "axis: -3 offset: 1 offset: 2 offset: 0"),
        ({"x": (2, 3, 6, 7), "r": (2, 3, 6, 2)}, "axis: 3 offset: 5"),
    ],
)
def test_crop_matches_opencv(shapes, params):
    compare_with_opencv(make_net(shapes, crop(params)))


def test_crop_window_and_reference_gradient():
    text = make_net(
        {"x": (2, 3, 6, 7), "r": (1, 2, 3, 4)}, crop("axis: 1 offset: 1 offset: 2 offset: 3")
    )
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    r = torch.randn(1, 2, 3, 4, requires_grad=True)
    y = Net(parse_net(text), "TEST")(x=x, r=r)["y"]
    torch.testing.assert_close(y, x[:, 1:3, 2:5, 3:7])
    y.sum().backward()
    assert r.grad is None or not r.grad.any()
    want = torch.zeros(2, 3, 6, 7)
    want[:, 1:3, 2:5, 3:7] = 1
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize(
    "text",
    [
        make_net({"x": (2, 3, 2)}, flatten()),
        make_net({"x": (2, 3, 2)}, reshape((0, -1, 2, 1))),
        make_net({"x": (2, 3, 4, 5), "r": (2, 3, 2, 3)}, crop("offset: 1")),
    ],
    ids=["flatten", "reshape", "crop"],
)
def test_gradcheck(text):
    gradcheck_net(text, check_inputs=["x"])


@pytest.mark.parametrize(
    "text, message",
    [
        (make_net({"x": X}, reshape((7, -1))), r"not divisible"),
        (make_net({"x": X}, reshape((2, 6, 4, 6))), r"\[2, 6, 4, 6\].*\[2, 6, 4, 5\]"),
        (make_net({"x": X}, reshape((-1, -1))), "more than one -1"),
        (make_net({"x": X}, reshape((0, 0), "axis: 3")), "no axis 4 to copy"),
        (make_net({"x": X}, reshape((1,), "axis: 5")), "axis 5 out of range"),
        (make_net({"x": X}, reshape((1,), "axis: 3 num_axes: 2")), "out of range"),
        (make_net({"x": X}, flatten("axis: 2 end_axis: 0")), "before axis"),
        (make_net({"x": X}, flatten("axis: 4")), "axis 4 out of range"),
        (make_net({"x": (2, 3, 4, 4), "r": (2, 3, 3, 3)}, crop("offset: 2")), "out of bounds"),
        (
            make_net({"x": (2, 3, 4, 4), "r": (2, 3, 3, 3)}, crop("offset: 0 offset: 0 offset: 0")),
            "3 offsets",
        ),
        (
            make_net({"x": X}, 'layer { name: "y" type: "Flatten" bottom: "x" top: "x" }'),
            "in-place",
        ),
    ],
)
def test_errors(text, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(text), "TEST")


def test_reshape_follows_new_input_shapes():
    net = Net(parse_net(make_net({"x": X}, reshape((0, -1)))), "TEST")
    assert net(x=torch.zeros(3, 2, 2))["y"].shape == (3, 4)
