"""Tile against a NumPy transcription of Caffe's TileLayer loops (forward copies, backward sums
the copies in order), float64 gradcheck, Caffe's setup checks and the runtime variants.

OpenCV 4 has a "Tile" layer, but it is ONNX's (it wants ``repeats`` and ignores tile_param):
it refuses Caffe's Tile, so the NumPy transcription is the reference; a test asserts that
OpenCV still refuses it (when it reads tile_param one day, that test fails and asks for an
OpenCV comparison)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import check_runtime_variants, compare_with_opencv, gradcheck_net, parse_net


def tile_net(params: str, shape=(2, 3, 4)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "tile_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "tile" type: "Tile" bottom: "data" top: "out" tile_param {{ {params} }} }}
"""


def caffe_tile(x: np.ndarray, axis: int, tiles: int, dy: np.ndarray | None = None):
    """Caffe's Forward_cpu / Backward_cpu on the flat arrays: outer slices copied ``tiles``
    times; the bottom diff is the first copy's diff plus each later one in turn."""
    axis = axis % x.ndim
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    flat = x.reshape(outer, inner)
    top = np.empty((outer * tiles, inner), np.float32)
    for i in range(outer):
        for t in range(tiles):
            top[i * tiles + t] = flat[i]
    shape = list(x.shape)
    shape[axis] *= tiles
    top = top.reshape(shape)
    if dy is None:
        return top, None
    d = dy.reshape(outer * tiles, inner)
    grad = np.empty((outer, inner), np.float32)
    for i in range(outer):
        grad[i] = d[i * tiles]
        for t in range(1, tiles):
            grad[i] = grad[i] + d[i * tiles + t]
    return top, grad.reshape(x.shape)


CASES = [  # (shape, axis, tiles)
    ((2, 3, 4), 1, 3),
    ((2, 3, 4), 0, 2),
    ((2, 3, 4), -1, 4),
    ((2, 3, 4), 2, 1),
    ((2, 3, 4, 5), 3, 5),
    ((2, 3, 4, 5), -4, 3),
    ((6,), 0, 2),
]


@pytest.mark.parametrize("shape,axis,tiles", CASES)
def test_forward_and_backward_match_caffe(shape, axis, tiles):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    net = Net(parse_net(tile_net(f"axis: {axis} tiles: {tiles}", shape)))
    ref, _ = caffe_tile(x, axis, tiles)
    assert net.blob_shapes["out"] == ref.shape
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(xt.grad.numpy(), caffe_tile(x, axis, tiles, dy)[1])


def test_default_axis_is_1():
    net = Net(parse_net(tile_net("tiles: 2", (2, 3, 4))))
    assert net.blob_shapes["out"] == (2, 6, 4)


def test_backward_adds_the_copies_in_caffes_order():
    # First copy + second, then + third: (1e8 + 1) rounds to 1e8 in float32, so the sum is 0
    # (a reduction adding 1 last would give 1).
    net = Net(parse_net(tile_net("axis: 0 tiles: 3", (1,))))
    x = torch.zeros(1, requires_grad=True)
    net(data=x)["out"].backward(torch.tensor([1e8, 1.0, -1e8]))
    assert x.grad.item() == 0.0


@pytest.mark.parametrize("shape,axis,tiles", [((2, 3, 2), 1, 3), ((2, 2, 3), -1, 2)])
def test_gradcheck(shape, axis, tiles):
    gradcheck_net(tile_net(f"axis: {axis} tiles: {tiles}", shape))


@pytest.mark.parametrize(
    "params,message",
    [
        ("axis: 1", "tile_param.tiles is required"),
        ("tiles: 0", "tile_param.tiles must be positive, got 0"),
        ("tiles: -2", "tile_param.tiles must be positive, got -2"),
        ("axis: 3 tiles: 2", "tile_param.axis 3 out of range for a 3-D blob"),
        ("axis: -4 tiles: 2", "tile_param.axis -4 out of range"),
    ],
)
def test_setup_errors(params, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(tile_net(params)))
    assert "layer 'tile' (Tile)" in str(info.value)


def test_reshape_follows_the_bottom():
    net = Net(parse_net(tile_net("axis: 0 tiles: 2", (2, 3))))
    assert tuple(net(data=torch.ones(5, 3))["out"].shape) == (10, 3)
    assert net.blob_shapes["out"] == (10, 3)


def test_opencv_refuses_caffes_tile():
    import cv2

    with pytest.raises(cv2.error, match="Tile: repeats needs to be treated as parameter"):
        compare_with_opencv(tile_net("axis: 1 tiles: 2", (2, 3, 4, 5)), tol=0)


def test_bf16_channels_last_and_compile():
    net = Net(parse_net(tile_net("axis: 1 tiles: 2", (2, 3, 4, 5))))
    check_runtime_variants(net, torch.randn(2, 3, 4, 5))
