"""Softmax against OpenCV 4; ArgMax against a NumPy transcription of argmax_layer.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net


def make_net(shape, body: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    head = f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}'
    return f"{head}\n{body}"


def softmax(params: str = "") -> str:
    return (
        f'layer {{ name: "y" type: "Softmax" bottom: "x" top: "y" softmax_param {{ {params} }} }}'
    )


def argmax(params: str = "") -> str:
    return f'layer {{ name: "y" type: "ArgMax" bottom: "x" top: "y" argmax_param {{ {params} }} }}'


@pytest.mark.parametrize(
    "shape, params",
    [
        ((2, 6, 4, 5), ""),
        ((2, 6, 4, 5), "axis: 2"),
        ((2, 6, 4, 5), "axis: -1"),
        ((3, 10), ""),
        ((4, 3, 2), "axis: 0"),
    ],
)
def test_softmax_matches_opencv(shape, params):
    # Large inputs: the maximum must be subtracted for exp not to overflow.
    compare_with_opencv(make_net(shape, softmax(params)), input_scale=30.0)


def test_softmax_stable_for_huge_values():
    net = Net(parse_net(make_net((1, 3), softmax())), "TEST")
    y = net(x=torch.tensor([[1000.0, 1000.0, -1000.0]]))["y"]
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("shape, params", [((2, 3, 2), ""), ((2, 3, 2), "axis: 2"), ((3, 4), "")])
def test_softmax_gradcheck(shape, params):
    gradcheck_net(make_net(shape, softmax(params)))


def caffe_argmax(x, top_k=1, out_max_val=False, axis=None):
    """argmax_layer.cpp: sort (value, index) pairs in descending order, keep the first top_k."""
    x = np.asarray(x, np.float32)
    if axis is None:
        rows = x.reshape(x.shape[0], -1)
        out = np.zeros((x.shape[0], 2 if out_max_val else 1, top_k))
        for n, row in enumerate(rows):
            best = sorted(((v, j) for j, v in enumerate(row)), reverse=True)[:top_k]
            out[n, 0] = [j for _, j in best]
            if out_max_val:
                out[n, 1] = [v for v, _ in best]
        return out.reshape(out.shape + (1,) * max(0, x.ndim - 3))
    moved = np.moveaxis(x, axis, -1)
    out = np.zeros(moved.shape[:-1] + (top_k,))
    for idx in np.ndindex(moved.shape[:-1]):
        best = sorted(((v, j) for j, v in enumerate(moved[idx])), reverse=True)[:top_k]
        out[idx] = [v if out_max_val else j for v, j in best]
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize(
    "shape, top_k, out_max_val, axis",
    [
        ((3, 4, 2, 2), 1, False, None),
        ((3, 4, 2, 2), 3, True, None),
        ((3, 10), 4, True, None),
        ((3, 10), 10, False, None),
        ((2, 3, 4), 2, False, None),
        ((2, 3, 2, 2, 2), 2, True, None),
        ((3, 4, 2, 2), 2, False, 1),
        ((3, 4, 2, 2), 2, True, 1),
        ((3, 4, 5), 3, False, -1),
        ((3, 4, 5), 1, True, 0),
    ],
)
def test_argmax_with_ties(shape, top_k, out_max_val, axis):
    # Integers in a small range: many ties, which Caffe ranks larger index first.
    x = np.random.default_rng(top_k).integers(0, 3, size=shape).astype(np.float32)
    params = f"top_k: {top_k} out_max_val: {str(out_max_val).lower()}"
    if axis is not None:
        params += f" axis: {axis}"
    net = Net(parse_net(make_net(shape, argmax(params))), "TEST")
    xt = torch.from_numpy(x).requires_grad_()
    y = net(x=xt)["y"]
    want = caffe_argmax(x, top_k, out_max_val, axis)
    assert tuple(y.shape) == want.shape == net.blob_shapes["y"]
    np.testing.assert_array_equal(y.numpy(), want)
    assert not y.requires_grad  # ArgMax has no backward


def test_argmax_indices_exact_beyond_bfloat16():
    x = torch.zeros(1, 1000)
    x[0, 777] = 1
    net = Net(parse_net(make_net((1, 1000), argmax())), "TEST")
    assert net(x=x.bfloat16())["y"].flatten().tolist() == [777.0]


@pytest.mark.parametrize(
    "shape, params, message",
    [
        ((2, 3), "top_k: 4", "top_k 4 exceeds the 3"),
        ((2, 3, 4), "top_k: 4 axis: 1", "top_k 4 exceeds the 3"),
        ((2, 3), "top_k: 0", "at least 1"),
        ((2, 3), "axis: 2", "axis 2 out of range"),
    ],
)
def test_argmax_errors(shape, params, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(make_net(shape, argmax(params))), "TEST")


def test_softmax_axis_error():
    with pytest.raises(CaffeAlexError, match="axis 3 out of range"):
        Net(parse_net(make_net((2, 3), softmax("axis: 3"))), "TEST")
