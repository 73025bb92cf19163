"""Interp (DeepLab v2 / PSPNet) and Upsample (caffe-segnet max-unpooling, YOLOv3 nearest):
output sizes as the forks' Reshape, forward and backward against NumPy transcriptions of the
forks' C++ loops (interp2 in float32 as the fork computes its weights), OpenCV 4 for Interp
where it implements it (no shrink_factor, no pads), float64 gradcheck, and the errors the forks'
CHECKs become."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import parse_net_text
from caffe_alex.net import Net
from tests.reference import check_runtime_variants, compare_with_opencv, parse_net


def dims(shape) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def interp_net(params: str, shape=(2, 3, 5, 7), size_shape=None) -> str:
    second = ""
    if size_shape is not None:
        second = (
            'layer { name: "s" type: "Input" top: "s" '
            f"input_param {{ shape {{ {dims(size_shape)} }} }} }}"
        )
    bottom = ' bottom: "s"' if size_shape is not None else ""
    return f"""name: "interp_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}
{second}
layer {{ name: "interp" type: "Interp" bottom: "data"{bottom} top: "out"
  interp_param {{ {params} }} }}
"""


# ---- NumPy transcriptions of src/caffe/util/interp.cpp (non-packed layout) --------------


def _axis_weights(size1: int, size2: int, dtype):
    """Per output index: source index, the +1 step (0 on the last row) and the two weights,
    with the fork's float arithmetic (ratio and positions in float32)."""
    f32 = np.float32
    ratio = f32(size1 - 1) / f32(size2 - 1) if size2 > 1 else f32(0)
    rows = []
    for i2 in range(size2):
        pos = f32(ratio * f32(i2))
        i1 = int(pos)
        step = 1 if i1 < size1 - 1 else 0
        lam1 = dtype(f32(pos - f32(i1)))
        rows.append((i1, step, dtype(1) - lam1, lam1))
    return rows


def caffe_interp2(data, offset: int, height1: int, width1: int, height2: int, width2: int):
    """caffe_cpu_interp2: data (C, Height1, Width1) cropped at (offset, offset) to
    height1 x width1, resampled to height2 x width2."""
    dtype = data.dtype.type
    out = np.zeros((data.shape[0], height2, width2), data.dtype)
    if (height1, width1) == (height2, width2):
        out[...] = data[:, offset : offset + height1, offset : offset + width1]
        return out
    for h2, (h1, hp, h0l, h1l) in enumerate(_axis_weights(height1, height2, dtype)):
        for w2, (w1, wp, w0l, w1l) in enumerate(_axis_weights(width1, width2, dtype)):
            r, c = offset + h1, offset + w1
            out[:, h2, w2] = h0l * (w0l * data[:, r, c] + w1l * data[:, r, c + wp]) + h1l * (
                w0l * data[:, r + hp, c] + w1l * data[:, r + hp, c + wp]
            )
    return out


def caffe_interp2_backward(diff, shape1, offset: int, height1: int, width1: int):
    """caffe_cpu_interp2_backward: accumulate the output diff (C, height2, width2) into the
    input's (C, Height1, Width1)."""
    dtype = diff.dtype.type
    grad = np.zeros(shape1, diff.dtype)
    height2, width2 = diff.shape[1:]
    if (height1, width1) == (height2, width2):
        grad[:, offset : offset + height1, offset : offset + width1] += diff
        return grad
    for h2, (h1, hp, h0l, h1l) in enumerate(_axis_weights(height1, height2, dtype)):
        for w2, (w1, wp, w0l, w1l) in enumerate(_axis_weights(width1, width2, dtype)):
            r, c, d = offset + h1, offset + w1, diff[:, h2, w2]
            grad[:, r, c] += h0l * w0l * d
            grad[:, r, c + wp] += h0l * w1l * d
            grad[:, r + hp, c] += h1l * w0l * d
            grad[:, r + hp, c + wp] += h1l * w1l * d
    return grad


def caffe_interp_size(h: int, pad_beg=0, pad_end=0, shrink=None, zoom=None, explicit=None):
    """InterpLayer::Reshape for one axis (the branch order of the fork)."""
    h = h + pad_beg + pad_end
    if shrink is not None and zoom is None:
        return (h - 1) // shrink + 1
    if zoom is not None and shrink is None:
        return h + (h - 1) * (zoom - 1)
    if explicit is not None:
        return explicit
    h = (h - 1) // shrink + 1
    return h + (h - 1) * (zoom - 1)


def run_interp(params: str, x: torch.Tensor, size_shape=None):
    net = Net(parse_net(interp_net(params, tuple(x.shape), size_shape)), "TEST")
    if x.dtype == torch.float64:
        net.double()
    feed = {"data": x}
    if size_shape is not None:
        feed["s"] = torch.zeros(size_shape, dtype=x.dtype)
    return net, net(**feed)["out"]


SIZE_CASES = [  # (input H, W, params, expected H, W) from the fork's formulas
    (5, 7, "zoom_factor: 3", (13, 19)),
    (5, 7, "shrink_factor: 2", (3, 4)),
    (9, 9, "shrink_factor: 4 zoom_factor: 3", (7, 7)),  # DeepLab v2 MSC data_res075
    (17, 17, "zoom_factor: 4 shrink_factor: 3", (21, 21)),  # its fc1_voc12_res075_interp
    (5, 7, "height: 9 width: 4", (9, 4)),
    (5, 7, "zoom_factor: 2 height: 3 width: 3", (9, 13)),  # zoom alone wins over height/width
    (6, 8, "zoom_factor: 2 pad_beg: -1 pad_end: -1", (7, 11)),
    (6, 8, "shrink_factor: 2 pad_end: -1", (3, 4)),
    (5, 7, "zoom_factor: 1", (5, 7)),
]


@pytest.mark.parametrize("h,w,params,expected", SIZE_CASES)
def test_interp_output_size_follows_the_fork(h, w, params, expected):
    net = Net(parse_net(interp_net(params, (1, 2, h, w))), "TEST")
    assert net.blob_shapes["out"] == (1, 2, *expected)


def test_interp_size_formula_transcription_agrees():
    # The same table through the transcription of Reshape, so the table above is not the only
    # source of truth.
    assert caffe_interp_size(5, zoom=3) == 13
    assert caffe_interp_size(9, shrink=4, zoom=3) == 7
    assert caffe_interp_size(17, shrink=3, zoom=4) == 21
    assert caffe_interp_size(6, -1, -1, zoom=2) == 7
    assert caffe_interp_size(8, 0, -1, shrink=2) == 4


def test_interp_takes_the_size_of_a_second_bottom():
    net, out = run_interp("", torch.randn(1, 2, 4, 5), size_shape=(1, 7, 9, 3))
    assert tuple(out.shape) == (1, 2, 9, 3)
    # height/width win over the second bottom, as in DeepLab v2's branch order
    net, out = run_interp("height: 6 width: 2", torch.randn(1, 2, 4, 5), size_shape=(1, 7, 9, 3))
    assert tuple(out.shape) == (1, 2, 6, 2)


FORWARD_CASES = [  # (shape, params)
    ((2, 3, 5, 7), "zoom_factor: 3"),
    ((1, 2, 9, 9), "shrink_factor: 4 zoom_factor: 3"),
    ((1, 2, 17, 13), "zoom_factor: 4 shrink_factor: 3"),
    ((2, 2, 6, 8), "zoom_factor: 2 pad_beg: -1 pad_end: -1"),
    ((1, 2, 7, 9), "height: 11 width: 5 pad_beg: -2 pad_end: 0"),
    ((1, 3, 5, 7), "height: 1 width: 6"),  # one output row: ratio 0
    ((1, 3, 1, 4), "height: 3 width: 9"),  # one input row: pairs with itself
    ((1, 3, 1, 1), "height: 4 width: 4"),
    ((1, 2, 5, 7), "height: 5 width: 3"),  # same height: the general path on one axis
    ((1, 2, 6, 8), "shrink_factor: 2 pad_beg: -1 pad_end: -1"),
    ((1, 1, 60, 60), "height: 473 width: 9"),  # PSPNet's final upsampling (60 -> 473)
]


def _reference(x: np.ndarray, params: str, out_hw):
    pad_beg = pad_end = 0
    tokens = params.split()
    for key, value in zip(tokens[::2], tokens[1::2]):
        if key == "pad_beg:":
            pad_beg = int(value)
        if key == "pad_end:":
            pad_end = int(value)
    h_in, w_in = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    flat = x.reshape(-1, *x.shape[2:])
    out = caffe_interp2(flat, -pad_beg, h_in, w_in, *out_hw)
    return out.reshape(*x.shape[:2], *out_hw), (pad_beg, h_in, w_in)


@pytest.mark.parametrize("shape,params", FORWARD_CASES)
def test_interp_forward_equals_the_fork_bit_for_bit(shape, params):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    _, out = run_interp(params, x)
    ref, _ = _reference(x.numpy(), params, tuple(out.shape[2:]))
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("shape,params", FORWARD_CASES[:6])
def test_interp_float64_keeps_the_forks_float32_weights(shape, params):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, out = run_interp(params, x)
    ref, _ = _reference(x.numpy(), params, tuple(out.shape[2:]))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("shape,params", FORWARD_CASES[:9])
def test_interp_backward_is_the_forks_interp2_backward(shape, params):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x.requires_grad_()
    _, out = run_interp(params, x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out.backward(dy)
    _, (pad_beg, h_in, w_in) = _reference(x.detach().numpy(), params, tuple(out.shape[2:]))
    flat_dy = dy.numpy().reshape(-1, *out.shape[2:])
    ref = caffe_interp2_backward(flat_dy, (flat_dy.shape[0], *shape[2:]), -pad_beg, h_in, w_in)
    np.testing.assert_allclose(x.grad.numpy(), ref.reshape(shape), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shape,params", [FORWARD_CASES[i] for i in (0, 1, 3, 6)])
def test_interp_gradcheck(shape, params):
    net = Net(parse_net(interp_net(params, shape)), "TEST").double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net(data=t)["out"], (x,))


@pytest.mark.parametrize(
    "shape,params",
    [
        ((2, 3, 5, 7), "zoom_factor: 3"),
        ((1, 4, 9, 9), "zoom_factor: 8"),
        ((2, 3, 5, 7), "height: 9 width: 4"),
        ((1, 2, 60, 60), "height: 473 width: 473"),
        ((1, 3, 5, 7), "height: 1 width: 6"),
    ],
)
def test_interp_matches_opencv(shape, params):
    # OpenCV names outputs by layer: give the top the layer's name
    compare_with_opencv(interp_net(params, shape).replace('top: "out"', 'top: "interp"'), tol=1e-6)


def test_interp_runs_on_channels_last_and_bf16():
    x = torch.randn(1, 3, 5, 7)
    _, ref = run_interp("zoom_factor: 3", x)
    _, cl = run_interp("zoom_factor: 3", x.to(memory_format=torch.channels_last))
    assert torch.equal(cl, ref)
    _, low = run_interp("zoom_factor: 3", x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)


def test_interp_equals_align_corners_bilinear():
    # The corner-aligned grid is PyTorch's align_corners=True (up to float rounding).
    x = torch.randn(2, 3, 5, 7)
    _, out = run_interp("height: 12 width: 4", x)
    ref = F.interpolate(x, size=(12, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def build_error(text: str) -> CaffeAlexError:
    net_param, source = parse_net_text(text, "net.prototxt")
    with pytest.raises(CaffeAlexError) as info:
        Net(net_param, "TEST", source=source)
    return info.value


@pytest.mark.parametrize(
    "params,message",
    [
        ("", r"no output size: interp_param sets neither height and width"),
        ("height: 5", r"no output size"),  # height without width: the fork's LOG\(FATAL\)
        ("pad_beg: 1 zoom_factor: 2", r"interp_param.pad_beg is 1: only values <= 0"),
        ("pad_end: 2 zoom_factor: 2", r"interp_param.pad_end is 2"),
        ("shrink_factor: 0", r"interp_param.shrink_factor must be >= 1, got 0"),
        ("zoom_factor: -1", r"interp_param.zoom_factor must be >= 1, got -1"),
        ("height: 0 width: 4", r"output size 0x4 must be positive"),
        ("zoom_factor: 2 pad_beg: -3 pad_end: -2", r"5x7 cropped .* leaves 0x2: must be positive"),
    ],
)
def test_interp_bad_settings_are_one_error_at_the_layer(params, message):
    error = build_error(interp_net(params))
    assert error.file == "net.prototxt" and error.line == 4  # the Interp block
    assert error.layer == "interp" and error.layer_type == "Interp"
    assert re.search(message, str(error)), str(error)


# ---- Upsample: caffe-segnet max-unpooling ------------------------------------------------


def caffe_max_pool(x: np.ndarray, kernel: int, stride: int, pad: int = 0):
    """BVLC/caffe-segnet MAX pooling with its mask (h * W + w of the first maximum)."""
    n, c, h, w = x.shape

    def pooled(size):
        out = -(-(size + 2 * pad - kernel) // stride) + 1
        return out - 1 if pad and (out - 1) * stride >= size + pad else out

    ph, pw = pooled(h), pooled(w)
    top = np.full((n, c, ph, pw), -np.inf, x.dtype)
    mask = np.full((n, c, ph, pw), -1.0, np.float32)
    for i in range(ph):
        for j in range(pw):
            hs, ws = i * stride - pad, j * stride - pad
            he, we = min(hs + kernel, h), min(ws + kernel, w)
            hs, ws = max(hs, 0), max(ws, 0)
            for a in range(n):
                for b in range(c):
                    for r in range(hs, he):
                        for s in range(ws, we):
                            if x[a, b, r, s] > top[a, b, i, j]:
                                top[a, b, i, j] = x[a, b, r, s]
                                mask[a, b, i, j] = r * w + s
    return top, mask


def caffe_unpool(x: np.ndarray, mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """UpsampleLayer::Forward_cpu: zeros, then top[mask[i]] = x[i] in order."""
    n, c = x.shape[:2]
    top = np.zeros((n, c, out_h * out_w), x.dtype)
    for a in range(n):
        for b in range(c):
            for value, idx in zip(x[a, b].ravel(), mask[a, b].ravel()):
                assert int(idx) < out_h * out_w
                top[a, b, int(idx)] = value
    return top.reshape(n, c, out_h, out_w)


def caffe_unpool_backward(dtop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """UpsampleLayer::Backward_cpu: bottom_diff[i] = top_diff[mask[i]]."""
    n, c = mask.shape[:2]
    flat = dtop.reshape(n, c, -1)
    grad = np.zeros(mask.shape, dtop.dtype)
    for a in range(n):
        for b in range(c):
            grad[a, b] = flat[a, b][mask[a, b].astype(np.int64)]
    return grad


def run_unpool(shape, pool, up, seed=0, dtype=torch.float32):
    """Pool ``data`` with our Pooling, unpool an independent ``dec`` of the pooled shape."""
    text = f"""name: "unpool_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
  pooling_param {{ pool: MAX {pool} }} }}
layer {{ name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "out"
  upsample_param {{ {up} }} }}
"""
    net = Net(parse_net(text), "TEST")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    net(data=x)
    return net, x


SEGNET_UP5 = "scale: 2 upsample_w: 60 upsample_h: 45"  # SegNet's upsample4 (360x480 input)
UNPOOL_CASES = [  # (shape, pooling, upsample params, output H, W)
    ((2, 3, 8, 6), "kernel_size: 2 stride: 2", "scale: 2", (8, 6)),
    ((1, 2, 9, 6), "kernel_size: 2 stride: 2", "scale: 2 pad_out_h: true", (9, 6)),
    ((1, 2, 7, 9), "kernel_size: 2 stride: 2", "scale: 2 pad_out_h: true pad_out_w: true", (7, 9)),
    ((1, 2, 45, 60), "kernel_size: 2 stride: 2", SEGNET_UP5, (45, 60)),
    ((1, 2, 9, 12), "kernel_size: 3 stride: 3", "scale_h: 3 scale_w: 3", (9, 12)),
    ((1, 2, 8, 8), "kernel_size: 3 stride: 2 pad: 1", "upsample_h: 8 upsample_w: 8", (8, 8)),
]


def test_pooling_mask_is_the_index_format_segnet_reads():
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(5))
    x[0, 0, :2, :2] = 1.5  # a tie: the first maximum in scan order
    for pool in ("kernel_size: 2 stride: 2", "kernel_size: 3 stride: 2 pad: 1"):
        net, _ = run_unpool(tuple(x.shape), pool, "scale: 2 pad_out_h: true pad_out_w: true")
        net(data=x)
        kernel, stride = (2, 2) if "kernel_size: 2" in pool else (3, 2)
        top, mask = caffe_max_pool(x.numpy(), kernel, stride, 1 if "pad: 1" in pool else 0)
        assert np.array_equal(net.blobs["pool"].numpy(), top)
        assert np.array_equal(net.blobs["mask"].numpy(), mask)
        assert net.blobs["mask"].dtype == torch.float32


@pytest.mark.parametrize("shape,pool,up,out_hw", UNPOOL_CASES)
def test_unpool_forward_and_backward_follow_segnet(shape, pool, up, out_hw):
    net, x = run_unpool(shape, pool, up)
    values, mask = net.blobs["pool"], net.blobs["mask"]
    out = net.blobs["out"]
    assert tuple(out.shape) == (*shape[:2], *out_hw)
    ref = caffe_unpool(values.numpy(), mask.numpy(), *out_hw)
    assert np.array_equal(out.numpy(), ref)
    # backward: from a fresh leaf standing in for the pooled values
    layer = net.layer("up")
    leaf = values.detach().clone().requires_grad_()
    top = layer(leaf, mask)
    dtop = torch.randn(top.shape, generator=torch.Generator().manual_seed(6))
    top.backward(dtop)
    assert np.array_equal(leaf.grad.numpy(), caffe_unpool_backward(dtop.numpy(), mask.numpy()))


def _upsample_layer(up: str, shape=(1, 1, 2, 2)):
    text = f"""name: "u"
layer {{ name: "in" type: "Input" top: "x" top: "m"
  input_param {{ shape {{ {dims(shape)} }} shape {{ {dims(shape)} }} }} }}
layer {{ name: "up" type: "Upsample" bottom: "x" bottom: "m" top: "out"
  upsample_param {{ {up} }} }}
"""
    return Net(parse_net(text), "TEST")


def test_unpool_repeated_index_keeps_the_last_write_and_gathers_for_every_source():
    net = _upsample_layer("scale: 2")
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    mask = torch.tensor([[[[5.0, 5.0], [0.0, 15.0]]]])  # two sources write target 5
    out = net(x=x, m=mask)["out"]
    ref = caffe_unpool(x.detach().numpy(), mask.numpy(), 4, 4)
    assert np.array_equal(out.detach().numpy(), ref)
    assert out[0, 0, 1, 1] == 2.0  # the later source wins, as the fork's loop
    dtop = torch.arange(16.0).reshape(1, 1, 4, 4)
    out.backward(dtop)
    # both sources of target 5 get its gradient, as the fork's gather does
    assert x.grad.tolist() == [[[[5.0, 5.0], [0.0, 15.0]]]]


def test_unpool_gradcheck_where_the_mask_has_no_repeats():
    net, _ = run_unpool((1, 2, 6, 4), "kernel_size: 2 stride: 2", "scale: 2", dtype=torch.float32)
    mask = net.blobs["mask"]
    layer = net.layer("up").double()
    values = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v, mask), (values,))


def test_unpool_mask_out_of_range_is_an_error_naming_the_layer():
    net = _upsample_layer("scale: 2")
    with pytest.raises(CaffeAlexError, match=r"layer 'up' \(Upsample\): mask value 16 \(element 3"):
        net(x=torch.ones(1, 1, 2, 2), m=torch.tensor([[[[0.0, 1.0], [2.0, 16.0]]]]))
    with pytest.raises(CaffeAlexError, match=r"mask value -1 "):
        net(x=torch.ones(1, 1, 2, 2), m=torch.tensor([[[[0.0, 1.0], [-1.0, 3.0]]]]))
    # the fork casts to int: -0.5 and 15.9 are 0 and 15
    out = net(x=torch.ones(1, 1, 2, 2), m=torch.tensor([[[[-0.5, 1.0], [2.0, 15.9]]]]))["out"]
    assert out.reshape(-1).nonzero().reshape(-1).tolist() == [0, 1, 2, 15]


def test_upsample_mask_shape_mismatch_is_one_error_at_the_layer():
    text = """name: "u"
layer { name: "in" type: "Input" top: "x" top: "m"
  input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } shape { dim: 1 dim: 2 dim: 4 dim: 3 } } }
layer { name: "up" type: "Upsample" bottom: "x" bottom: "m" top: "out"
  upsample_param { scale: 2 } }
"""
    error = build_error(text)
    assert (error.file, error.line, error.layer, error.layer_type) == (
        "net.prototxt",
        4,
        "up",
        "Upsample",
    )
    assert "the mask (bottom 1) has shape [1, 2, 4, 3], but bottom 0 has [1, 2, 3, 3]" in str(error)


@pytest.mark.parametrize(
    "up,message",
    [
        ("scale: 1", r"upsample_param.scale must be > 1, got 1"),
        ("scale_h: 2", r"give upsample_h and upsample_w, or scale, or scale_h and scale_w"),
        ("scale: 2 scale_h: 2 scale_w: 2", r"not scale together with scale_h or scale_w"),
        ("scale: 3 pad_out_h: true", r"pad_out_h needs a scale of 2 on that axis, got 3"),
        ("upsample_h: 1 upsample_w: 4", r"upsample_param.upsample_h must be > 1, got 1"),
        ("scale_h: 2 scale_w: 1", r"upsample_param.scale_w must be > 1, got 1"),
    ],
)
def test_unpool_settings_the_fork_checks(up, message):
    error = build_error(
        f"""name: "u"
layer {{ name: "in" type: "Input" top: "x" top: "m"
  input_param {{ shape {{ {dims((1, 1, 2, 2))} }} shape {{ {dims((1, 1, 2, 2))} }} }} }}
layer {{ name: "up" type: "Upsample" bottom: "x" bottom: "m" top: "out"
  upsample_param {{ {up} }} }}
"""
    )
    assert error.layer == "up" and error.line == 4
    assert re.search(message, str(error)), str(error)


# ---- Upsample: YOLOv3 ports' nearest-neighbour ------------------------------------------


def nearest_net(up: str, shape=(2, 3, 4, 5)) -> str:
    return f"""name: "nearest_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}
layer {{ name: "up" type: "Upsample" bottom: "data" top: "out" upsample_param {{ {up} }} }}
"""


def yolo_upsample(x: np.ndarray, scale: int) -> np.ndarray:
    """The YOLOv3 port's Forward_cpu: output[h, w] = input[h / scale, w / scale]."""
    n, c, h, w = x.shape
    out = np.empty((n, c, h * scale, w * scale), x.dtype)
    for i in range(h * scale):
        for j in range(w * scale):
            out[:, :, i, j] = x[:, :, i // scale, j // scale]
    return out


def yolo_upsample_backward(dtop: np.ndarray, scale: int) -> np.ndarray:
    n, c, h, w = dtop.shape
    grad = np.zeros((n, c, h // scale, w // scale), dtop.dtype)
    for i in range(h // scale):
        for j in range(w // scale):
            for a in range(scale):
                for b in range(scale):
                    grad[:, :, i, j] += dtop[:, :, i * scale + b, j * scale + a]
    return grad


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_nearest_upsample_repeats_pixels_and_sums_back(scale):
    net = Net(parse_net(nearest_net(f"scale: {scale}")), "TEST").double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = net(data=x)["out"]
    assert np.array_equal(out.detach().numpy(), yolo_upsample(x.detach().numpy(), scale))
    dtop = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dtop)
    np.testing.assert_allclose(x.grad.numpy(), yolo_upsample_backward(dtop.numpy(), scale))
    assert torch.autograd.gradcheck(lambda t: net(data=t)["out"], (x,))


def test_nearest_upsample_defaults_to_the_ports_scale_1():
    net = Net(parse_net(nearest_net("")), "TEST")
    assert net.blob_shapes["out"] == (2, 3, 4, 5)


@pytest.mark.parametrize(
    "up,message",
    [
        ("scale: 0", r"upsample_param.scale must be >= 1, got 0"),
        ("scale: 2 upsample_h: 8", r"upsample_param.upsample_h needs a pooling mask"),
    ],
)
def test_nearest_upsample_bad_settings(up, message):
    error = build_error(nearest_net(up))
    assert error.layer == "up" and error.line == 3
    assert re.search(message, str(error)), str(error)


@pytest.mark.parametrize(
    "text",
    [
        interp_net("zoom_factor: 2 pad_beg: -1", (1, 3, 6, 7)),
        f"""name: "u"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ {dims((1, 3, 6, 7))} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "out"
  upsample_param {{ scale: 2 pad_out_w: true }} }}
""",
        nearest_net("scale: 2", (1, 3, 6, 7)),
    ],
    ids=["interp", "unpool", "nearest"],
)
def test_channels_last_bf16_and_compile(text):
    net = Net(parse_net(text), "TEST")
    check_runtime_variants(net, torch.randn(1, 3, 6, 7))
