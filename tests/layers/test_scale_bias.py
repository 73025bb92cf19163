"""Scale and Bias against OpenCV 4 where it implements the case, otherwise against NumPy
broadcasting of Caffe's definition (scale_layer.cpp, bias_layer.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net, randomize


def make_net(shapes: dict, body: str) -> str:
    tops = " ".join(f'top: "{n}"' for n in shapes)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    return f'layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}\n{body}\n'


def layer(kind: str, params: str = "", bottoms=("x",)) -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    field = "scale_param" if kind == "Scale" else "bias_param"
    return f'layer {{ name: "y" type: "{kind}" {bottom} top: "y" {field} {{ {params} }} }}'


X = (2, 3, 4, 5)


@pytest.mark.parametrize(
    "params",
    [
        "",
        "bias_term: true",
        "axis: 1 num_axes: 2 bias_term: true",
        "axis: 2 num_axes: -1",
        "axis: 0 num_axes: 4 bias_term: true",
        "axis: 3 bias_term: true",
    ],
)
def test_scale_one_bottom_matches_opencv(params):
    compare_with_opencv(make_net({"x": X}, layer("Scale", params)))


@pytest.mark.parametrize(
    "shape, axis", [((3,), 1), ((2, 3), 0), ((3, 4, 5), 1), ((5,), 3), ((4, 5), 2)]
)
def test_scale_two_bottoms_matches_opencv(shape, axis):
    body = layer("Scale", f"axis: {axis}", ("x", "s"))
    compare_with_opencv(make_net({"x": X, "s": shape}, body))


def forward(text: str, **inputs):
    net = Net(parse_net(text), "TEST")
    randomize(net, seed=3)
    feeds = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in inputs.items()}
    out = net(**feeds)["y"].detach().numpy()
    return out, [b.detach().numpy() for b in net.params.get("y", [])]


def placed(operand, axis: int, ndim: int):
    """NumPy broadcasting of an operand applied to a bottom from ``axis`` on."""
    operand = np.asarray(operand)
    return operand.reshape((1,) * axis + operand.shape + (1,) * (ndim - axis - operand.ndim))


RNG = np.random.default_rng(0)
x = RNG.standard_normal(X).astype(np.float32)


@pytest.mark.parametrize(
    "params, axis", [("num_axes: 0 bias_term: true", 0), ("axis: -1", 3), ("axis: -3", 1)]
)
def test_scale_scalar_and_negative_axis(params, axis):
    y, blobs = forward(make_net({"x": X}, layer("Scale", params)), x=x)
    want = x * placed(blobs[0], axis, 4)
    if len(blobs) > 1:
        want = want + placed(blobs[1], axis, 4)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert blobs[0].shape == {0: (), 3: (5,), 1: (3,)}[axis]


def test_scale_two_bottoms_with_bias_has_only_the_bias_blob():
    s = RNG.standard_normal((3, 4)).astype(np.float32)
    text = make_net({"x": X, "s": (3, 4)}, layer("Scale", "bias_term: true", ("x", "s")))
    y, blobs = forward(text, x=x, s=s)
    assert [b.shape for b in blobs] == [(3, 4)]
    np.testing.assert_allclose(y, x * placed(s, 1, 4) + placed(blobs[0], 1, 4), rtol=1e-6)


def test_default_fillers():
    net = Net(parse_net(make_net({"x": X}, layer("Scale", "bias_term: true"))), "TEST")
    scale, bias = net.params["y"]
    assert torch.equal(scale, torch.ones(3)) and torch.equal(bias, torch.zeros(3))
    filled = 'filler { type: "constant" value: 2 } bias_filler { type: "constant" value: 3 }'
    net = Net(parse_net(make_net({"x": X}, layer("Scale", "bias_term: true " + filled))), "TEST")
    assert [b.tolist() for b in net.params["y"]] == [[2.0] * 3, [3.0] * 3]
    net = Net(parse_net(make_net({"x": X}, layer("Bias"))), "TEST")
    assert torch.equal(net.params["y"][0], torch.zeros(3))


@pytest.mark.parametrize(
    "params, axis",
    [("", 1), ("axis: 2 num_axes: -1", 2), ("num_axes: 0", 0), ("axis: 0 num_axes: 2", 0)],
)
def test_bias_one_bottom(params, axis):
    y, blobs = forward(make_net({"x": X}, layer("Bias", params)), x=x)
    np.testing.assert_allclose(y, x + placed(blobs[0], axis, 4), rtol=1e-6)


@pytest.mark.parametrize("shape, axis", [((3,), 1), ((4, 5), 2), ((2, 3, 4, 5), 0), ((), 1)])
def test_bias_two_bottoms(shape, axis):
    b = RNG.standard_normal(shape).astype(np.float32)
    text = make_net({"x": X, "b": shape}, layer("Bias", f"axis: {axis}", ("x", "b")))
    y, blobs = forward(text, x=x, b=b)
    assert blobs == []
    np.testing.assert_allclose(y, x + placed(b, 0 if b.ndim == 0 else axis, 4), rtol=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        make_net({"x": (2, 3, 2)}, layer("Scale", "bias_term: true")),
        make_net({"x": (2, 3, 2)}, layer("Scale", "axis: 1 num_axes: -1 bias_term: true")),
        make_net({"x": (2, 3, 2)}, layer("Scale", "num_axes: 0 bias_term: true")),
        make_net({"x": (2, 3, 2), "s": (3, 2)}, layer("Scale", "bias_term: true", ("x", "s"))),
        make_net({"x": (2, 3, 2), "s": (2,)}, layer("Scale", "axis: 0", ("x", "s"))),
        make_net({"x": (2, 3, 2)}, layer("Bias", "axis: 0 num_axes: 2")),
        make_net({"x": (2, 3, 2), "b": (3,)}, layer("Bias", "", ("x", "b"))),
    ],
    ids=[
        "scale_bias",
        "scale_all_axes",
        "scale_scalar",
        "scale_2bottom_bias",
        "scale_2bottom_axis0",
        "bias_2axes",
        "bias_2bottom",
    ],
)
def test_gradcheck(text):
    gradcheck_net(text)


@pytest.mark.parametrize(
    "text, message",
    [
        (make_net({"x": X, "s": (4,)}, layer("Scale", "", ("x", "s"))), r"\[4\] does not match"),
        (make_net({"x": X}, layer("Scale", "axis: 2 num_axes: 3")), "extends past"),
        (make_net({"x": X}, layer("Bias", "axis: 4")), "axis 4 out of range"),
        (make_net({"x": X}, layer("Bias", "num_axes: -2")), "num_axes must be"),
    ],
)
def test_config_errors(text, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(text), "TEST")


def test_learned_operand_must_still_fit_after_reshape():
    net = Net(parse_net(make_net({"x": X}, layer("Scale"))), "TEST")
    with pytest.raises(CaffeAlexError, match="does not match"):
        net(x=torch.zeros(2, 4, 4, 5))
