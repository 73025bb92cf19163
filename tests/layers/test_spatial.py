"""Im2col and SPP against NumPy transcriptions of Caffe's im2col/col2im and of SPP's pyramid
of Caffe Poolings (GetPoolingParam, pooled sizes, MAX first-maximum rule, AVE divisor), float64
gradcheck, Caffe's checks, the Reshape rule and the runtime variants.

OpenCV 4's Caffe importer has neither type, so the NumPy transcriptions are the references; a
test asserts that OpenCV still refuses them (when a release reads them, it fails and asks for
an OpenCV comparison), and any other OpenCV error fails it too.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.layers.spatial import _Im2colND
from caffe_alex.net import Net
from tests.reference import check_runtime_variants, compare_with_opencv, gradcheck_net, parse_net

FLT_MAX = np.float32(3.4028234663852886e38)


def one_layer_net(kind: str, params: str, shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "spatial_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "l" type: "{kind}" bottom: "data" top: "out" {params} }}
"""


def im2col_net(conv: str, shape) -> str:
    return one_layer_net("Im2col", f"convolution_param {{ {conv} }}", shape)


def spp_net(spp: str, shape) -> str:
    return one_layer_net("SPP", f"spp_param {{ {spp} }}", shape)


def assert_opencv_refuses(text: str, kind: str) -> None:
    import cv2

    with pytest.raises(cv2.error, match=f'Can\'t create layer "l" of type "{kind}"'):
        compare_with_opencv(text, tol=1e-6)


# -- Im2col -----------------------------------------------------------------------------------
def caffe_im2col(x, kernel, stride, pad, dilation, dcols=None):
    """im2col of one item (C, *spatial): row c * K + kernel offset, column = output position;
    outside the image reads 0. With ``dcols``, col2im instead: the bottom diff accumulated
    channel by channel, kernel offset by kernel offset, position by position."""
    c_in, spatial = x.shape[0], x.shape[1:]
    out = [
        int((d + 2 * p - (dl * (k - 1) + 1)) / s) + 1
        for d, k, s, p, dl in zip(spatial, kernel, stride, pad, dilation)
    ]
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    cols = np.zeros((c_in * len(offsets), *out), np.float32)
    grad = np.zeros_like(x)
    for c in range(c_in):
        for ki, off in enumerate(offsets):
            for pos in itertools.product(*(range(o) for o in out)):
                at = tuple(
                    q * s - p + o * dl for q, s, p, o, dl in zip(pos, stride, pad, off, dilation)
                )
                if all(0 <= a < d for a, d in zip(at, spatial)):
                    if dcols is None:
                        cols[(c * len(offsets) + ki, *pos)] = x[(c, *at)]
                    else:
                        grad[(c, *at)] += dcols[(c * len(offsets) + ki, *pos)]
    return grad if dcols is not None else cols


IM2COL_CASES = [  # (bottom shape, convolution_param, kernel, stride, pad, dilation, axis)
    ((2, 3, 6, 7), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 2, 5, 6), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
     (2, 3), (1, 2), (0, 1), (1, 1), 1),
    ((2, 2, 10, 9), "kernel_size: 3 stride: 2 dilation: 3", (3, 3), (2, 2), (0, 0), (3, 3), 1),
    ((1, 2, 3, 4), "kernel_size: 5 stride: 3", (5, 5), (3, 3), (0, 0), (1, 1), 1),  # sticks out
    ((1, 2, 5, 5), "kernel_size: 3 dilation: 0 dilation: 2", (3, 3), (1, 1), (0, 0), (0, 2), 1),
    ((2, 3, 7), "kernel_size: 3 stride: 2 pad: 1", (3,), (2,), (1,), (1,), 1),
    ((1, 2, 4, 5, 3), "kernel_size: 2 kernel_size: 3 kernel_size: 1 pad: 1",
     (2, 3, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    ((2, 2, 2, 4, 5), "axis: 2 kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), (1, 1), 2),
    ((3, 5, 6), "axis: 0 kernel_size: 2", (2, 2), (1, 1), (0, 0), (1, 1), 0),
    ((2, 3, 6, 7), "axis: -3 kernel_size: 2", (2, 2), (1, 1), (0, 0), (1, 1), 1),
    ((2, 3, 6, 7), "kernel_size: 3 stride: 2 pad: 1 force_nd_im2col: true",
     (3, 3), (2, 2), (1, 1), (1, 1), 1),
]  # fmt: skip


@pytest.mark.parametrize("shape,conv,kernel,stride,pad,dilation,axis", IM2COL_CASES)
def test_im2col_matches_caffe(shape, conv, kernel, stride, pad, dilation, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    net = Net(parse_net(im2col_net(conv, shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    assert tuple(y.shape) == net.blob_shapes["out"]
    items = x.reshape(-1, *shape[axis:])
    ref = np.stack([caffe_im2col(item, kernel, stride, pad, dilation) for item in items])
    ref = ref.reshape(*shape[:axis], *ref.shape[1:])
    assert ref.shape == tuple(y.shape)
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    dys = dy.reshape(-1, *ref.shape[axis:])
    grad = np.stack(
        [caffe_im2col(i, kernel, stride, pad, dilation, d) for i, d in zip(items, dys)]
    ).reshape(shape)
    np.testing.assert_array_equal(xt.grad.numpy(), grad)


def test_im2col_unfold_and_slicing_paths_agree():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 8, generator=gen, requires_grad=True)
    net = Net(parse_net(im2col_net("kernel_size: 3 stride: 2 pad: 2 dilation: 2", (2, 3, 9, 8))))
    y = net(data=x)["out"]
    x2 = x.detach().clone().requires_grad_()
    y2 = _Im2colND.apply(x2, (3, 3), (2, 2), (2, 2), (2, 2), tuple(y.shape[2:]))
    assert torch.equal(y, y2.reshape(y.shape))
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    y2.backward(dy.reshape(y2.shape))
    assert torch.equal(x.grad, x2.grad)


def test_im2col_output_sizes():
    # Caffe's truncating division: span -3 at stride 2 gives 0 outputs (an empty top), span
    # -1 gives 1; span -6 gives -2, which Blob::Reshape refuses.
    net = Net(parse_net(im2col_net("kernel_size: 5 stride: 2", (1, 2, 2, 4))))
    assert net.blob_shapes["out"] == (1, 50, 0, 1)
    assert tuple(net(data=torch.randn(1, 2, 2, 4))["out"].shape) == (1, 50, 0, 1)
    with pytest.raises(CaffeAlexError, match=r"output spatial size \[-2, 1\] is negative"):
        Net(parse_net(im2col_net("kernel_size: 7 stride: 2", (1, 2, 1, 6))))


@pytest.mark.parametrize(
    "conv,shape,message",
    [
        ("stride: 2", (1, 2, 4, 4), "kernel_size must be given once or once per spatial axis"),
        ("kernel_size: 0", (1, 2, 4, 4), r"kernel sizes must be positive, got \[0, 0\]"),
        ("kernel_h: 2", (1, 2, 4, 4), r"kernel sizes must be positive, got \[2, 0\]"),
        ("kernel_size: 2 stride: 0", (1, 2, 4, 4), "stride sizes must be positive"),
        ("kernel_size: 2 stride_h: 2", (1, 2, 4, 4), r"stride sizes must be positive, got \[2, 0"),
        ("kernel_h: 2 kernel_w: 2", (1, 2, 4), "kernel_h/kernel_w can only be used for 2-D"),
        ("kernel_size: 2 kernel_h: 2 kernel_w: 2", (1, 2, 4, 4), "either kernel_size or kernel_h"),
        ("kernel_size: 2 pad: 1 pad: 1 pad: 1", (1, 2, 4, 4), "pad must be given once or once"),
        ("kernel_size: 2 axis: 3", (1, 2, 4, 4), "needs a spatial axis after the channel axis 3"),
        ("kernel_size: 2 axis: 4", (1, 2, 4, 4), "convolution_param.axis 4 out of range"),
    ],
)
def test_im2col_setup_errors(conv, shape, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(im2col_net(conv, shape)))
    assert "layer 'l' (Im2col)" in str(info.value)


@pytest.mark.parametrize(
    "conv,shape",
    [("kernel_size: 2 stride: 1 pad: 1", (2, 2, 3, 3)), ("kernel_size: 2 dilation: 0", (1, 2, 3)),
     ("kernel_size: 3 stride: 2", (1, 1, 2, 3))],
)  # fmt: skip
def test_im2col_gradcheck(conv, shape):
    gradcheck_net(im2col_net(conv, shape))


def test_opencv_has_no_im2col():
    assert_opencv_refuses(im2col_net("kernel_size: 3", (1, 2, 4, 4)), "Im2col")


def test_im2col_bf16_and_channels_last():
    # (torch.compile of unfold costs seconds here; SPP's test below covers compile)
    net = Net(parse_net(im2col_net("kernel_size: 3 stride: 2 pad: 1", (2, 3, 6, 7))))
    x = torch.randn(2, 3, 6, 7)
    ref = net(data=x)["out"]
    assert torch.equal(net(data=x.to(memory_format=torch.channels_last))["out"], ref)
    low = net(data=x.bfloat16())["out"]
    assert low.dtype == torch.bfloat16  # a copy: exactly the rounded input's columns
    assert torch.equal(low.float(), net(data=x.bfloat16().float())["out"])


# -- SPP --------------------------------------------------------------------------------------
def caffe_spp_level(level, height, width):
    """GetPoolingParam: kernel, pad, stride (= kernel) per axis for 2^level bins."""
    bins = 2**level
    kernel = [math.ceil(s / bins) for s in (height, width)]
    pad = [(k * bins - s + 1) // 2 for k, s in zip(kernel, (height, width))]
    return kernel, pad


def caffe_pool(x, kernel, pad, method, dy=None):
    """Caffe's Pooling (CEIL rounding, stride = kernel) forward, or with ``dy`` its backward."""
    n, c, height, width = x.shape
    (kh, kw), (ph, pw) = kernel, pad
    size = []
    for d, k, p in ((height, kh, ph), (width, kw, pw)):
        o = int(math.ceil((d + 2 * p - k) / k)) + 1
        if p and (o - 1) * k >= d + p:
            o -= 1
        size.append(o)
    top = np.zeros((n, c, *size), np.float32)
    grad = np.zeros(x.shape, np.float64)
    for i, j in itertools.product(range(size[0]), range(size[1])):
        hs, ws = i * kh - ph, j * kw - pw
        he, we = min(hs + kh, height + ph), min(ws + kw, width + pw)
        area = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
        window = x[:, :, hs:he, ws:we].reshape(n, c, -1)
        if method == "MAX":
            if window.shape[-1] == 0:
                top[:, :, i, j] = -FLT_MAX
                continue
            first = window.argmax(-1)  # the first maximum in scan order, as Caffe's strict >
            top[:, :, i, j] = np.take_along_axis(window, first[..., None], -1)[..., 0]
            if dy is not None:
                h, w = hs + first // (we - ws), ws + first % (we - ws)
                for a, b in itertools.product(range(n), range(c)):
                    grad[a, b, h[a, b], w[a, b]] += dy[a, b, i, j]
        else:
            top[:, :, i, j] = window.astype(np.float64).sum(-1) / area
            if dy is not None:
                grad[:, :, hs:he, ws:we] += (dy[:, :, i, j] / area)[:, :, None, None]
    return top if dy is None else grad


def caffe_spp(x, height_levels, method, dy=None):
    n, _, height, width = x.shape
    tops, grad, offset = [], np.zeros(x.shape, np.float64), 0
    for level in range(height_levels):
        kernel, pad = caffe_spp_level(level, height, width)
        top = caffe_pool(x, kernel, pad, method)
        tops.append(top.reshape(n, -1) if height_levels > 1 else top)
        if dy is not None:
            count = top[0].size
            part = dy[:, offset : offset + count] if height_levels > 1 else dy
            grad += caffe_pool(x, kernel, pad, method, part.reshape(top.shape))
            offset += count
    if dy is not None:
        return grad
    return np.concatenate(tops, 1) if height_levels > 1 else tops[0]


SPP_CASES = [  # (shape, pyramid_height, pool)
    ((2, 3, 9, 8), 3, "MAX"),
    ((2, 3, 9, 8), 3, "AVE"),
    ((3, 2, 7, 7), 3, "MAX"),
    ((1, 2, 16, 14), 4, "AVE"),
    ((2, 3, 5, 6), 1, "MAX"),
    ((2, 3, 5, 6), 1, "AVE"),
    ((2, 2, 3, 6), 2, "AVE"),
]


@pytest.mark.parametrize("shape,height,pool", SPP_CASES)
def test_spp_matches_caffe(shape, height, pool):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    net = Net(parse_net(spp_net(f"pyramid_height: {height} pool: {pool}", shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    ref = caffe_spp(x, height, pool)
    assert tuple(y.shape) == ref.shape == net.blob_shapes["out"]
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6, atol=1e-7)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(
        xt.grad.numpy(), caffe_spp(x, height, pool, dy), rtol=1e-5, atol=1e-6
    )


def test_spp_shapes_of_caffes_tests():
    # src/caffe/test/test_spp_layer.cpp: C * (4^h - 1) / 3 features; height 1 is not flattened
    for shape, height, features in [((2, 3, 9, 8), 3, 63), ((4, 3, 1024, 765), 5, 1023),
                                    ((10, 3, 7, 7), 3, 63)]:  # fmt: skip
        net = Net(parse_net(spp_net(f"pyramid_height: {height}", shape)))
        assert net.blob_shapes["out"] == (shape[0], features)
    net = Net(parse_net(spp_net("pyramid_height: 1", (2, 3, 9, 8))))
    assert net.blob_shapes["out"] == (2, 3, 1, 1)


def test_spp_max_ties_go_to_the_first_maximum():
    net = Net(parse_net(spp_net("pyramid_height: 2 pool: MAX", (1, 1, 4, 4))))
    x = torch.ones(1, 1, 4, 4, requires_grad=True)
    net(data=x)["out"].sum().backward()
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0] += 1  # level 0: one 4x4 window
    for i, j in itertools.product(range(2), range(2)):
        expected[2 * i, 2 * j] += 1  # level 1: 2x2 windows, first element of each
    np.testing.assert_array_equal(x.grad[0, 0].numpy(), expected)


def test_spp_recomputes_the_levels_when_the_input_size_changes():
    net = Net(parse_net(spp_net("pyramid_height: 3 pool: AVE", (2, 3, 9, 8))))
    x = np.random.default_rng(4).standard_normal((2, 3, 13, 10)).astype(np.float32)
    y = net(data=torch.from_numpy(x))["out"]
    np.testing.assert_allclose(y.numpy(), caffe_spp(x, 3, "AVE"), rtol=1e-6, atol=1e-7)
    assert net.blob_shapes["out"] == (2, 63)
    with pytest.raises(CaffeAlexError, match="layer 'l' \\(SPP\\): pyramid level 2"):
        net(data=torch.randn(2, 3, 5, 6))


@pytest.mark.parametrize(
    "spp,shape,message",
    [
        ("pool: MAX", (2, 3, 8, 8), "spp_param.pyramid_height must be positive"),
        ("pyramid_height: 2 pool: STOCHASTIC", (2, 3, 8, 8), "pool STOCHASTIC is not supported"),
        ("pyramid_height: 2", (2, 3, 8), r"needs a 4-D \(N, C, H, W\) bottom"),
        ("pyramid_height: 2", (2, 3, 0, 8), "input height and width must be positive"),
        # 5 rows at 4x4 bins: kernel 2, pad (2*4 - 5 + 1) / 2 = 2, which Pooling refuses
        ("pyramid_height: 3", (2, 3, 5, 8), r"pyramid level 2 \(4x4 bins\) of a 5x8 bottom: pad "),
        ("pyramid_height: 2", (2, 3, 1, 8), r"pyramid level 1 \(2x2 bins\) of a 1x8 bottom"),
    ],
)
def test_spp_setup_errors(spp, shape, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(spp_net(spp, shape)))
    assert "layer 'l' (SPP)" in str(info.value)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_gradcheck(pool):
    gradcheck_net(spp_net(f"pyramid_height: 3 pool: {pool}", (1, 2, 5, 4)).replace(
        "dim: 5", "dim: 4"))  # fmt: skip


def test_opencv_has_no_spp():
    assert_opencv_refuses(spp_net("pyramid_height: 2", (1, 2, 4, 4)), "SPP")


def test_spp_bf16_channels_last_and_compile():
    net = Net(parse_net(spp_net("pyramid_height: 3 pool: AVE", (2, 3, 9, 8))))
    check_runtime_variants(net, torch.randn(2, 3, 9, 8))


def test_im2col_accepts_the_convolution_fields_it_ignores():
    # Caffe's Im2col layer reads only the geometry: a param copied from a Convolution builds
    conv = "kernel_size: 2 num_output: 4 group: 2 bias_term: false weight_filler { type: 'xavier' }"
    net = Net(parse_net(im2col_net(conv, (1, 2, 4, 4))))
    assert net.blob_shapes["out"] == (1, 8, 3, 3) and not list(net.params)
