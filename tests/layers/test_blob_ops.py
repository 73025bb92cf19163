"""Concat, Slice, Split and Silence against OpenCV 4 and NumPy (concat/slice/split_layer.cpp)."""

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


def concat(params: str, n: int) -> str:
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n))
    return f'layer {{ name: "y" type: "Concat" {bottoms} top: "y" concat_param {{ {params} }} }}'


def slice_layer(params: str, n_top: int) -> str:
    """A Slice whose tops t1.. are each re-exposed by a one-bottom Concat (an identity), because
    OpenCV only answers for a layer's first top under the layer's name."""
    tops = " ".join(f'top: "t{i}"' for i in range(n_top))
    body = f'layer {{ name: "t0" type: "Slice" bottom: "x" {tops} slice_param {{ {params} }} }}'
    for i in range(1, n_top):
        body += f'\nlayer {{ name: "u{i}" type: "Concat" bottom: "t{i}" top: "u{i}" }}'
    return body


@pytest.mark.parametrize(
    "shapes, params",
    [
        ([(2, 3, 4, 5), (2, 1, 4, 5)], ""),
        ([(2, 3, 4, 5), (2, 3, 1, 5), (2, 3, 2, 5)], "axis: -2"),
        ([(2, 3, 4, 5), (1, 3, 4, 5)], "axis: 0"),
        ([(4, 3), (4, 5)], "axis: 1"),
        ([(2, 3, 4, 5)], ""),
    ],
)
def test_concat_matches_opencv(shapes, params):
    text = make_net({f"b{i}": s for i, s in enumerate(shapes)}, concat(params, len(shapes)))
    compare_with_opencv(text)


def run(text: str, **inputs) -> dict:
    net = Net(parse_net(text), "TEST")
    out = net(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    return {k: v.detach().numpy() for k, v in {**net.blobs, **out}.items()}


def test_concat_legacy_concat_dim():
    a, b = np.ones((2, 3, 2), np.float32), np.zeros((1, 3, 2), np.float32)
    y = run(make_net({"b0": a.shape, "b1": b.shape}, concat("concat_dim: 0", 2)), b0=a, b1=b)["y"]
    np.testing.assert_array_equal(y, np.concatenate([a, b], axis=0))


@pytest.mark.parametrize(
    "shape, params, n_top",
    [
        ((2, 6, 4, 5), "slice_point: 1 slice_point: 4", 3),
        ((2, 6, 4, 5), "axis: 2 slice_point: 3", 2),
        ((6, 4), "axis: 0 slice_point: 2 slice_point: 3 slice_point: 5", 4),
    ],
)
def test_slice_matches_opencv(shape, params, n_top):
    compare_with_opencv(make_net({"x": shape}, slice_layer(params, n_top)))


@pytest.mark.parametrize(
    "params, axis, n_top", [("", 1, 3), ("axis: -1", 2, 5), ("", 1, 2), ("", 1, 1)]
)
def test_slice_equal_parts(params, axis, n_top):
    # OpenCV's importer splits into two parts when no slice_point is given: NumPy instead.
    x = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
    out = run(make_net({"x": x.shape}, slice_layer(params, n_top)), x=x)
    for i, part in enumerate(np.split(x, n_top, axis=axis)):
        np.testing.assert_array_equal(out[f"t{i}"], part)


def test_slice_legacy_slice_dim():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    out = run(make_net({"x": x.shape}, slice_layer("slice_dim: 0 slice_point: 1", 2)), x=x)
    np.testing.assert_array_equal(out["t0"], x[:1])
    np.testing.assert_array_equal(out["t1"], x[1:])


def test_split_and_silence():
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    body = """
layer { name: "s" type: "Split" bottom: "x" top: "a" top: "b" top: "c" }
layer { name: "q" type: "Silence" bottom: "c" bottom: "a" }
"""
    net = Net(parse_net(make_net({"x": x.shape}, body)), "TEST")
    out = net(x=torch.from_numpy(x))
    assert list(out) == ["b"]  # silenced blobs are not net outputs
    for name in "abc":
        np.testing.assert_array_equal(net.blobs[name].numpy(), x)


def test_split_gradients_sum():
    body = """
layer { name: "s" type: "Split" bottom: "x" top: "a" top: "b" }
layer { name: "p" type: "Eltwise" bottom: "a" bottom: "b" top: "p"
        eltwise_param { operation: PROD } }
"""
    text = make_net({"x": (2, 3)}, body)
    net = Net(parse_net(text), "TEST")
    x = torch.randn(2, 3, requires_grad=True)
    net(x=x)["p"].sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    gradcheck_net(text, outputs=["p", "a"])


@pytest.mark.parametrize(
    "text",
    [
        make_net({"b0": (2, 3, 2), "b1": (2, 1, 2)}, concat("", 2)),
        make_net({"b0": (2, 3, 2), "b1": (1, 3, 2)}, concat("axis: 0", 2)),
        make_net({"x": (2, 6, 3)}, slice_layer("slice_point: 2 slice_point: 5", 3)),
        make_net({"x": (2, 6, 3)}, slice_layer("axis: 2", 3)),
        make_net({"x": (2, 3)}, 'layer { name: "s" type: "Split" bottom: "x" top: "a" top: "b" }'),
    ],
    ids=["concat_axis1", "concat_axis0", "slice_points", "slice_equal", "split"],
)
def test_gradcheck(text):
    gradcheck_net(text)


@pytest.mark.parametrize(
    "text, message",
    [
        (make_net({"b0": (2, 3, 4), "b1": (2, 3, 5)}, concat("", 2)), r"\[2, 3, 4\].*\[2, 3, 5\]"),
        (make_net({"b0": (2, 3, 4), "b1": (2, 3)}, concat("", 2)), r"\[2, 3, 4\].*\[2, 3\]"),
        (make_net({"b0": (2, 3), "b1": (2, 3)}, concat("axis: 1 concat_dim: 1", 2)), "not both"),
        (make_net({"b0": (2, 3), "b1": (2, 3)}, concat("axis: 2", 2)), "axis 2 out of range"),
        (make_net({"x": (2, 6)}, slice_layer("", 4)), "4 tops do not evenly divide"),
        (make_net({"x": (2, 6)}, slice_layer("slice_point: 3", 3)), "1 slice_point values"),
        (make_net({"x": (2, 6)}, slice_layer("slice_point: 3 slice_point: 3", 3)), "increasing"),
        (make_net({"x": (2, 6)}, slice_layer("slice_point: 7", 2)), "within"),
        (make_net({"x": (2, 6)}, slice_layer("slice_dim: 2", 2)), "slice_dim 2 out of range"),
        (
            make_net({"x": (2,)}, 'layer { name: "s" type: "Split" bottom: "x" top: "x" }'),
            "in-place",
        ),
    ],
)
def test_errors(text, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(text), "TEST")
