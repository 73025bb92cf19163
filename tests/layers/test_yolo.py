"""Reorg and Region (quhezheng/caffe_yolo_v2) against NumPy transcriptions of the port's loops
and OpenCV 4 (its Reorg is Darknet's; its Region is compared through the decoding in
tests/yolo_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import (
    build_error,
    caffemodel_bytes,
    check_runtime_variants,
    compare_with_opencv,
    opencv_forward,
    parse_net,
    relative_error,
)
from tests.whole_net import opencv_outputs
from tests.yolo_reference import decoded_like_opencv, opencv_region_text, region_anchor_model


def one_layer(kind: str, params: str, shape, name: str = "out", top: str = "out") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "yolo_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "{name}" type: "{kind}" bottom: "data" top: "{top}" {params} }}
"""


def forward(text: str, x: np.ndarray, requires_grad: bool = False):
    net = Net(parse_net(text), "TEST")
    xt = torch.from_numpy(x).requires_grad_(requires_grad)
    return net, xt, net(data=xt)["out"]


# ---- Reorg ---------------------------------------------------------------------------------


def port_reorg(bottom: np.ndarray, stride: int, reverse: bool) -> np.ndarray:
    """The port's reorg_cpu(bottom, w, h, c, n, stride, forward=reverse, top) over flat memory:
    the loops run over the bottom's [c, h, w]; the other side is indexed as
    [c / stride^2, h * stride, w * stride]."""
    n, c, h, w = bottom.shape
    src = bottom.reshape(-1)
    out = np.empty_like(src)
    t_c, t_h, t_w = c // (stride * stride), h * stride, w * stride
    for b in range(n):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    b_index = i + w * (j + h * (k + c * b))
                    c2, offset = k % t_c, k // t_c
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    t_index = w2 + t_w * (h2 + t_h * (c2 + t_c * b))
                    if reverse:
                        out[t_index] = src[b_index]
                    else:
                        out[b_index] = src[t_index]
    if reverse:
        return out.reshape(n, t_c, t_h, t_w)
    return out.reshape(n, c * stride * stride, h // stride, w // stride)


REORGS = [((1, 8, 4, 6), 2), ((2, 12, 4, 2), 2), ((2, 9, 6, 3), 3), ((1, 4, 2, 2), 1)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,stride", REORGS)
def test_reorg_matches_port_loops(shape, stride, reverse):
    x = np.random.default_rng(0).standard_normal(shape)
    params = f"reorg_param {{ stride: {stride} reverse: {str(reverse).lower()} }}"
    _, _, top = forward(one_layer("Reorg", params, shape), x)
    np.testing.assert_array_equal(top.detach().numpy(), port_reorg(x, stride, reverse))


@pytest.mark.parametrize("shape,stride", REORGS[:3])
def test_reorg_reverse_is_not_the_inverse_of_reorg(shape, stride):
    # Both directions run the loops over their own bottom's [c, h, w]: reverse on the reorged
    # top is another reordering, not the way back (Darknet's reorg behaves the same).
    x = np.random.default_rng(1).standard_normal(shape)
    _, _, top = forward(one_layer("Reorg", f"reorg_param {{ stride: {stride} }}", shape), x)
    back = one_layer("Reorg", f"reorg_param {{ stride: {stride} reverse: true }}", top.shape)
    _, _, again = forward(back, top.detach().numpy())
    assert again.shape == x.shape and not np.array_equal(again.detach().numpy(), x)
    np.testing.assert_array_equal(
        again.detach().numpy(), port_reorg(port_reorg(x, stride, False), stride, True)
    )


@pytest.mark.parametrize("shape,stride", REORGS[:3])
def test_reorg_matches_opencv(shape, stride):
    # OpenCV reads its stride from a field named reorg_stride (default 2, the port's stride
    # field is ignored there): give each its own spelling.
    text = one_layer("Reorg", f"reorg_param {{ stride: {stride} }}", shape)
    net = Net(parse_net(text), "TEST")
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(x))["out"].numpy()
    cv_text = text.replace(f"stride: {stride}", f"reorg_stride: {stride}")
    theirs = opencv_forward(cv_text, net, {"data": x}, ["out"])["out"]
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_reorg_stride_2_matches_opencv_as_written():
    compare_with_opencv(one_layer("Reorg", "reorg_param { stride: 2 }", (2, 16, 6, 4)), tol=0)


@pytest.mark.parametrize("reverse", ["false", "true"])
def test_reorg_backward_is_zero_as_in_the_port(reverse):
    # The port's Backward_cpu reorders a buffer it never fills (zeros); its Backward_gpu writes
    # into the top's diff. Either way the bottom's gradient stays zero.
    x = np.random.default_rng(3).standard_normal((2, 8, 4, 4))
    params = f"reorg_param {{ stride: 2 reverse: {reverse} }}"
    _, xt, top = forward(one_layer("Reorg", params, x.shape), x, requires_grad=True)
    top.backward(torch.ones_like(top))
    assert torch.equal(xt.grad, torch.zeros_like(xt))


@pytest.mark.parametrize(
    "params,shape,message",
    [
        ("", (1, 8, 4, 4), "reorg_param.stride is required"),
        ("reorg_param { stride: 0 }", (1, 8, 4, 4), "must be positive, got 0"),
        ("reorg_param { stride: 2 }", (1, 8, 5, 4), r"bottom shape \[1, 8, 5, 4\]"),
        ("reorg_param { stride: 2 }", (1, 6, 4, 4), "channels divisible by 4"),
        ("reorg_param { stride: 2 reverse: true }", (1, 6, 2, 2), "divisible by 4, got 6"),
        ("reorg_param { stride: 2 }", (1, 8, 4), "4-D"),
    ],
)
def test_reorg_errors(params, shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(one_layer("Reorg", params, shape)), "TEST")


def test_reorg_in_place_is_refused(tmp_path):
    text = one_layer("Reorg", "reorg_param { stride: 2 }", (1, 8, 4, 4), "reorg", top="data")
    error = build_error(tmp_path, text)
    assert (error.line, error.layer) == (3, "reorg")
    assert "does not allow in-place computation (top 'data' is its bottom)" in error.message


# ---- Region --------------------------------------------------------------------------------


def port_region(bottom: np.ndarray, boxes: int, classes: int, softmax: bool) -> np.ndarray:
    """The port's Region Forward_cpu: flatten (c, h*w) -> (h*w, c) per sample, logistic at
    entry 4 of each box, softmax (max-subtracted) over the classes from entry 5."""
    n, c, h, w = bottom.shape
    size = 4 + 1 + classes
    top = np.empty(bottom.size)
    area = h * w
    for b in range(n):
        for ch in range(c):
            for i in range(area):
                top[b * c * area + i * c + ch] = bottom.reshape(-1)[b * c * area + ch * area + i]
    for b in range(n):
        for i in range(area * boxes):
            index = size * i + b * area * c
            top[index + 4] = 1.0 / (1.0 + np.exp(-top[index + 4]))
            if softmax:
                scores = top[index + 5 : index + 5 + classes]
                e = np.exp(scores - scores.max())
                top[index + 5 : index + 5 + classes] = e / e.sum()
    return top.reshape(bottom.shape)


def region_params(boxes, classes, softmax=True, extra="") -> str:
    flag = "true" if softmax else "false"
    return (
        f"region_param {{ classes: {classes} coords: 4 boxes_of_each_grid: {boxes} "
        f"softmax: {flag} {extra} }}"
    )


REGIONS = [((1, 2 * 8, 3, 4), 2, 3), ((2, 5 * 25, 2, 2), 5, 20), ((1, 6, 1, 1), 1, 1)]


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("shape,boxes,classes", REGIONS)
def test_region_matches_port_loops(shape, boxes, classes, softmax):
    x = np.random.default_rng(4).standard_normal(shape) * 3
    text = one_layer("Region", region_params(boxes, classes, softmax), shape)
    _, _, top = forward(text, x)
    expected = port_region(x, boxes, classes, softmax)
    np.testing.assert_allclose(top.detach().numpy(), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape,boxes,classes", REGIONS[:2])
def test_region_matches_opencv_region_decoded(shape, boxes, classes):
    text = one_layer("Region", region_params(boxes, classes), shape)
    net = Net(parse_net(text), "TEST")
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(x))["out"].numpy()
    anchors = np.arange(1, 2 * boxes + 1) * 0.75
    model = caffemodel_bytes(net) + region_anchor_model("out", anchors)
    cv_text = opencv_region_text(text, boxes)
    theirs = opencv_outputs(cv_text, model, {"data": x}, {"out": "out"})["out"]
    expected = decoded_like_opencv(ours, boxes, anchors)
    assert theirs.size == expected.size
    assert relative_error(expected, theirs) <= 1e-6


def test_region_accepts_and_ignores_anchors():
    anchors = 'anchors: "1.08,1.19, 3.42,4.41"'
    shape = (1, 2 * 7, 2, 3)
    x = np.random.default_rng(6).standard_normal(shape)
    _, _, with_anchors = forward(one_layer("Region", region_params(2, 2, extra=anchors), shape), x)
    _, _, without = forward(one_layer("Region", region_params(2, 2), shape), x)
    assert torch.equal(with_anchors, without)


def test_region_backward_is_zero_as_in_the_port():
    x = np.random.default_rng(7).standard_normal((1, 16, 2, 2))
    text = one_layer("Region", region_params(2, 3), x.shape)
    _, xt, top = forward(text, x, requires_grad=True)
    top.backward(torch.ones_like(top))
    assert torch.equal(xt.grad, torch.zeros_like(xt))


@pytest.mark.parametrize(
    "params,shape,message",
    [
        (region_params(2, 3), (1, 15, 2, 2), r"15 channels .* = 16"),
        (region_params(2, 3).replace("coords: 4", "coords: 5"), (1, 18, 2, 2), "coords 5"),
        (region_params(0, 3), (1, 16, 2, 2), "must be positive"),
        (region_params(2, 3), (1, 16, 4), "4-D"),
    ],
)
def test_region_errors(params, shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(one_layer("Region", params, shape)), "TEST")


def test_region_in_place_is_refused(tmp_path):
    text = one_layer("Region", region_params(2, 3), (1, 16, 2, 2), "region", top="data")
    error = build_error(tmp_path, text)
    assert (error.line, error.layer) == (3, "region")
    assert "does not allow in-place computation" in error.message


@pytest.mark.parametrize(
    "kind,params,shape",
    [
        ("Reorg", "reorg_param { stride: 2 }", (2, 8, 4, 4)),
        ("Reorg", "reorg_param { stride: 2 reverse: true }", (2, 8, 4, 4)),
        ("Region", region_params(2, 3), (2, 16, 3, 3)),
    ],
)
def test_channels_last_bf16_compile_and_meta(kind, params, shape):
    net = Net(parse_net(one_layer(kind, params, shape)), "TEST")
    check_runtime_variants(net, torch.randn(shape) * 4)
    top = net.to("meta")(data=torch.empty(shape, device="meta"))["out"]
    assert top.device.type == "meta" and tuple(top.shape) == net.blob_shapes["out"]
