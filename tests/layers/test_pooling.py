"""Pooling against OpenCV 4 and a NumPy transcription of Caffe's pooling loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_alex.errors import CaffeAlexError
from caffe_alex.layers.pooling import PoolingLayer
from caffe_alex.net import Net
from tests.corpus import CORPUS
from tests.reference import compare_with_opencv, gradcheck_net, parse_net
from tests.whole_net import compare_net_with_opencv

FLT_MAX = float(np.finfo(np.float32).max)


def pool_net(params: str, shape=(2, 3, 7, 7), tops=("pool",)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "pool_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" {top_lines}
  pooling_param {{ {params} }} }}
"""


def caffe_pool(x, method, kh, kw, sh=1, sw=1, ph=0, pw=0, ceil=True, global_pooling=False):
    """Caffe's PoolingLayer forward (Caffe engine, CPU/GPU) written as plain loops."""
    n, c, height, width = x.shape
    if global_pooling:
        kh, kw = height, width

    def size(length, k, s, p):
        out = (math.ceil if ceil else math.floor)((length + 2 * p - k) / s) + 1
        return out - 1 if p and (out - 1) * s >= length + p else out

    oh, ow = size(height, kh, sh, ph), size(width, kw, sw, pw)
    top = np.zeros((n, c, oh, ow), dtype=np.float64)
    mask = np.full((n, c, oh, ow), -1.0)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "AVE":
                he, we = min(hs + kh, height + ph), min(ws + kw, width + pw)
                area = (he - hs) * (we - ws)
                window = x[:, :, max(hs, 0) : min(he, height), max(ws, 0) : min(we, width)]
                with np.errstate(invalid="ignore", divide="ignore"):
                    top[:, :, i, j] = window.sum(axis=(2, 3)) / area
                continue
            he, we = min(hs + kh, height), min(ws + kw, width)
            best = np.full((n, c), -FLT_MAX)
            for h in range(max(hs, 0), he):
                for w in range(max(ws, 0), we):
                    better = x[:, :, h, w] > best
                    best = np.where(better, x[:, :, h, w], best)
                    mask[:, :, i, j] = np.where(better, h * width + w, mask[:, :, i, j])
            top[:, :, i, j] = best
    return top, mask


def run_net(text, x, phase="TEST"):
    net = Net(parse_net(text), phase)
    out = net(data=torch.from_numpy(x))
    return net, out


# (shape, params) cases: ceil clipping the last window, strides that do not divide, pad with ceil,
# kernel_h != kernel_w, global pooling, kernel larger than the image, FLOOR rounding.
CASES = [
    ((2, 3, 7, 7), "kernel_size: 3 stride: 2"),
    ((2, 3, 6, 6), "kernel_size: 3 stride: 2"),
    ((2, 3, 6, 6), "kernel_size: 3 stride: 2 pad: 1"),
    ((1, 2, 13, 13), "kernel_size: 3 stride: 2"),
    ((1, 2, 8, 10), "kernel_size: 2 stride: 3"),
    ((1, 2, 10, 11), "kernel_size: 4 stride: 3 pad: 2"),
    ((1, 2, 7, 8), "kernel_size: 3 stride: 2 pad: 2"),
    ((1, 2, 9, 9), "kernel_size: 5 stride: 3 pad: 4"),
    ((1, 2, 5, 5), "kernel_size: 2 stride: 2 pad: 1"),
    ((1, 2, 9, 8), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
    ((1, 2, 9, 8), "kernel_h: 2 kernel_w: 4 stride: 2 pad_h: 1 pad_w: 2"),
    ((2, 3, 5, 7), "global_pooling: true"),
    ((1, 2, 7, 7), "kernel_size: 3 stride: 2 round_mode: FLOOR"),
    ((1, 2, 8, 8), "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    ((1, 2, 7, 8), "kernel_size: 2 stride: 2 round_mode: FLOOR"),
    ((1, 1, 1, 1), "kernel_size: 1"),
    # Caffe-only cases (OpenCV rejects or differs): the kernel is larger than the image; ceil
    # adds a window that starts past the image (stride > kernel, no pad).
    ((1, 2, 2, 2), "kernel_size: 3 stride: 2"),
    ((1, 2, 8, 9), "kernel_size: 2 stride: 3"),
]
# OpenCV 4.14 cannot read round_mode (its caffe.proto predates it): FLOOR is checked on loops.
OPENCV_CASES = [c for c in CASES[:-2] if "FLOOR" not in c[1]]


def _kwargs(params: str) -> dict:
    msg = parse_net(pool_net(params)).layer[1].pooling_param
    kh = msg.kernel_h if msg.HasField("kernel_h") else msg.kernel_size
    kw = msg.kernel_w if msg.HasField("kernel_w") else msg.kernel_size
    sh = msg.stride_h if msg.HasField("stride_h") else msg.stride
    sw = msg.stride_w if msg.HasField("stride_w") else msg.stride
    ph = msg.pad_h if msg.HasField("pad_h") else msg.pad
    pw = msg.pad_w if msg.HasField("pad_w") else msg.pad
    ceil = msg.round_mode == 0
    return dict(
        kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, ceil=ceil, global_pooling=msg.global_pooling
    )


@pytest.mark.parametrize("path", ["auto", "explicit"])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,params", CASES)
def test_matches_caffe_loops(method, shape, params, path, monkeypatch):
    # "explicit" forces the pad-then-pool path that handles what PyTorch's pooling cannot.
    if path == "explicit":
        monkeypatch.setattr(PoolingLayer, "_native", lambda *args: False)
    x = np.random.default_rng(1).standard_normal(shape)
    _, out = run_net(pool_net(f"pool: {method} {params}", shape), x)
    expected, _ = caffe_pool(x, method, **_kwargs(params))
    assert out["pool"].shape == expected.shape
    np.testing.assert_allclose(out["pool"].numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,params", OPENCV_CASES)
def test_matches_opencv(method, shape, params):
    compare_with_opencv(pool_net(f"pool: {method} {params}", shape), tol=1e-6)


def test_ave_corner_divides_by_clipped_window():
    # 6x6, k3 s2 p1 gives 4x4 windows starting at -1, 1, 3, 5. Caffe clips each window to
    # [-1, 7), not to the image: the top-left one keeps its 3x3 divisor (over 2x2 real pixels),
    # the bottom-right one [5, 8) is clipped to [5, 7) and divides by 2*2 = 4 (1 real pixel).
    x = np.ones((1, 1, 6, 6))
    _, out = run_net(pool_net("pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 1, 6, 6)), x)
    top = out["pool"].numpy()[0, 0]
    assert top.shape == (4, 4)
    assert top[0, 0] == pytest.approx(4 / 9)  # 2x2 real pixels over the 3x3 window
    assert top[-1, -1] == pytest.approx(1 / 4)  # 1 real pixel over the window clipped to 2x2
    assert top[1, 1] == pytest.approx(1.0)


@pytest.mark.parametrize("path", ["auto", "explicit"])
def test_max_ties_first_in_scan_order_and_mask_top(path, monkeypatch):
    if path == "explicit":
        monkeypatch.setattr(PoolingLayer, "_native", lambda *args: False)
    x = np.random.default_rng(2).integers(0, 3, size=(2, 2, 7, 6)).astype(np.float64)
    text = pool_net("pool: MAX kernel_size: 3 stride: 2 pad: 1", x.shape, tops=("pool", "mask"))
    net, _ = run_net(text, x)
    expected, mask = caffe_pool(x, "MAX", 3, 3, 2, 2, 1, 1)
    np.testing.assert_array_equal(net.blobs["pool"].numpy(), expected)
    np.testing.assert_array_equal(net.blobs["mask"].numpy(), mask)
    # The gradient goes to the winner only: bottom_diff[mask] += top_diff.
    xt = torch.from_numpy(x).requires_grad_()
    top_grad = torch.rand(expected.shape, dtype=torch.float64)
    net(data=xt)["pool"].backward(top_grad)
    want = np.zeros(x.shape).reshape(2, 2, -1)
    for idx in np.ndindex(*expected.shape):
        want[idx[0], idx[1], int(mask[idx])] += top_grad[idx].item()
    np.testing.assert_allclose(xt.grad.numpy().reshape(want.shape), want)


def test_empty_windows_follow_caffe():
    # k1 s2 without pad: ceil adds a window starting past the image. Caffe keeps it: MAX gives
    # -FLT_MAX with mask -1, AVE divides 0 by a zero area.
    x = np.random.default_rng(3).standard_normal((1, 1, 4, 4))
    _, out = run_net(pool_net("pool: MAX kernel_size: 1 stride: 2", x.shape, ("p", "m")), x)
    expected, mask = caffe_pool(x, "MAX", 1, 1, 2, 2)
    assert out["p"].shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(out["p"].numpy(), expected)
    np.testing.assert_array_equal(out["m"].numpy(), mask)
    _, out = run_net(pool_net("pool: AVE kernel_size: 1 stride: 2", x.shape), x)
    expected, _ = caffe_pool(x, "AVE", 1, 1, 2, 2)
    np.testing.assert_array_equal(out["pool"].numpy(), expected)  # NaN where Caffe has NaN


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("stride,pad", [(2147483647, 0), (2147483647, 1), (1000, 1)])
def test_a_stride_past_the_image_pools_without_padding_to_it(method, stride, pad):
    # ceil rounding adds a window at the stride (past the image) or pad drops it: Caffe's
    # windows, computed without padding the bottom out to the stride
    x = np.random.default_rng(5).standard_normal((1, 2, 5, 4))
    tops = ("p", "m") if method == "MAX" else ("p",)
    params = f"pool: {method} kernel_size: 2 stride: {stride} pad: {pad}"
    _, out = run_net(pool_net(params, x.shape, tops), x)
    expected, mask = caffe_pool(x, method, 2, 2, stride, stride, pad, pad)
    assert out["p"].shape == expected.shape == ((1, 2, 1, 1) if pad else (1, 2, 2, 2))
    np.testing.assert_allclose(out["p"].numpy(), expected, rtol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(out["m"].numpy(), mask)


def test_reshape_recomputes_ceil_size():
    net = Net(parse_net(pool_net("pool: MAX kernel_size: 3 stride: 2", (1, 1, 7, 7))), "TEST")
    out = net(data=torch.randn(1, 1, 8, 10))
    assert out["pool"].shape == (1, 1, 4, 5)


@pytest.mark.parametrize(
    "params",
    [
        "pool: MAX kernel_size: 3 stride: 2 pad: 1",
        "pool: AVE kernel_size: 3 stride: 2 pad: 1",
        "pool: AVE kernel_h: 2 kernel_w: 3 stride: 2",
        "pool: MAX global_pooling: true",
    ],
)
def test_gradcheck(params):
    gradcheck_net(pool_net(params, (1, 2, 5, 6)))


def stochastic_test_reference(x, k, s):
    _, _, height, width = x.shape
    oh = math.ceil((height - k) / s) + 1
    ow = math.ceil((width - k) / s) + 1
    top = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s : min(i * s + k, height), j * s : min(j * s + k, width)]
            tiny = float(np.finfo(np.float32).tiny)
            top[:, :, i, j] = (win * win).sum(axis=(2, 3)) / (tiny + win.sum(axis=(2, 3)))
    return top


def test_stochastic_test_phase_is_probability_weighted_average():
    x = np.random.default_rng(4).random((2, 2, 7, 8))
    _, out = run_net(pool_net("pool: STOCHASTIC kernel_size: 3 stride: 2", x.shape), x)
    np.testing.assert_allclose(out["pool"].numpy(), stochastic_test_reference(x, 3, 2))


def test_stochastic_train_samples_by_probability():
    torch.manual_seed(0)
    x = np.zeros((1, 1, 2, 4000))
    x[0, 0, 0, 0::2], x[0, 0, 1, 1::2] = 1.0, 3.0  # each 2x2 window holds a 1 and a 3
    text = pool_net("pool: STOCHASTIC kernel_size: 2 stride: 2", x.shape)
    xt = torch.from_numpy(x).requires_grad_()
    net = Net(parse_net(text), "TRAIN")
    top = net(data=xt)["pool"]
    assert set(np.unique(top.detach().numpy())) <= {1.0, 3.0}
    assert abs((top == 3).double().mean().item() - 0.75) < 0.03
    top.sum().backward()  # the gradient goes to the sampled position only
    assert torch.equal(xt.grad.sum(dim=(2, 3)), torch.tensor([[2000.0]], dtype=torch.float64))
    assert torch.equal(xt.grad[x == 3] == 1, (top == 3).flatten())


@pytest.mark.parametrize(
    "params,message",
    [
        ("pool: MAX kernel_size: 2 pad: 2", "smaller than kernel"),
        ("pool: MAX global_pooling: true kernel_size: 2", "global_pooling"),
        ("pool: MAX global_pooling: true stride: 2", "global_pooling"),
        ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "kernel_size"),
        ("pool: MAX kernel_h: 2", "kernel_h"),
        ("pool: MAX", "kernel_size"),
        ("pool: MAX kernel_size: 2 stride: 2 stride_h: 1 stride_w: 1", "stride"),
        ("pool: STOCHASTIC kernel_size: 3 pad: 1", "STOCHASTIC"),
    ],
)
def test_config_errors(params, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(pool_net(params)), "TEST")


def test_shape_errors():
    with pytest.raises(CaffeAlexError, match="mask"):
        Net(parse_net(pool_net("pool: AVE kernel_size: 2", tops=("a", "b"))), "TEST")
    with pytest.raises(CaffeAlexError, match="4-D"):
        Net(parse_net(pool_net("pool: MAX kernel_size: 2", shape=(2, 3, 7))), "TEST")


# ---- the forks' ceil_mode (caffe-fast-rcnn, DenseNet and SSD ports) ----------------------------

CEIL_MODE = [  # each pooled size differs between the two roundings
    ((1, 2, 8, 8), "kernel_size: 3 stride: 2"),
    ((1, 2, 8, 8), "kernel_size: 3 stride: 2 pad: 1"),  # DenseNet's pool1 on an even map
    ((1, 2, 7, 8), "kernel_size: 2 stride: 2"),
    ((1, 2, 10, 8), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0"),
]


@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,params", CEIL_MODE)
def test_ceil_mode_matches_caffe_loops_and_round_mode(shape, params, method, ceil):
    # The forks' rule: ceil or floor of (size + 2 pad - kernel) / stride, plus one, then the
    # same drop of a last window starting in the padding as BVLC's round_mode.
    x = np.random.default_rng(6).standard_normal(shape)
    flag = str(ceil).lower()
    _, out = run_net(pool_net(f"pool: {method} {params} ceil_mode: {flag}", shape), x)
    expected, _ = caffe_pool(x, method, **{**_kwargs(params), "ceil": ceil})
    np.testing.assert_allclose(out["pool"].numpy(), expected, rtol=1e-12, atol=1e-12)
    mode = "CEIL" if ceil else "FLOOR"
    _, same = run_net(pool_net(f"pool: {method} {params} round_mode: {mode}", shape), x)
    np.testing.assert_array_equal(out["pool"].numpy(), same["pool"].numpy())


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,params", CEIL_MODE)
def test_ceil_mode_false_matches_opencv(shape, params, method):
    # OpenCV's caffe.proto has the forks' ceil_mode (not round_mode)
    text = pool_net(f"pool: {method} {params} ceil_mode: false", shape)
    compare_with_opencv(text, tol=1e-6)
    assert (
        Net(parse_net(text), "TEST").blob_shapes["pool"]
        != (Net(parse_net(pool_net(f"pool: {method} {params}", shape)), "TEST").blob_shapes["pool"])
    )


def test_ceil_mode_with_round_mode_names_file_line_layer_and_both_values(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(
        pool_net("pool: MAX kernel_size: 3 stride: 2 ceil_mode: true round_mode: FLOOR")
    )
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    assert str(info.value) == (
        f"{path}:3: layer 'pool' (Pooling): pooling_param sets both round_mode (FLOOR) and the "
        "forks' ceil_mode (true); give only one of them"
    )


@pytest.mark.slow
def test_densenet_121_with_ceil_mode_false_builds_and_matches_opencv():
    path = CORPUS / "shicai__DenseNet-Caffe" / "DenseNet_121.prototxt"
    if not path.is_file():
        pytest.skip("../shared/corpus is not present")
    for phase in ("TRAIN", "TEST"):
        assert Net.from_prototxt(str(path), phase).blob_shapes["pool1"] == (1, 64, 56, 56)
    # 64 x 64 keeps every layer (global pooling at the end); pool1 (ceil_mode: false) then gives
    # 16 x 16 where CEIL would give 17 x 17.
    net, *_ = compare_net_with_opencv(str(path), input_shapes={"data": (1, 3, 64, 64)})
    assert net.blob_shapes["pool1"] == (1, 64, 16, 16)


@pytest.mark.parametrize(
    "shape,kernel,stride,pad,ceil",
    [((4, 8, 13, 13), 3, 2, 0, True), ((2, 5, 9, 7), 2, 2, 1, False),
     ((3, 16, 6, 6), 3, 1, 1, True), ((1, 3, 5, 8), (2, 3), (1, 2), (0, 1), True)],
)  # fmt: skip
def test_nhwc_max_pooling_is_bit_for_bit_pytorchs_nchw(shape, kernel, stride, pad, ceil):
    """The NHWC route (pooling.py's _MaxPoolInNHWC) against F.max_pool2d on the NCHW tensor:
    the same top, and the same bottom diff (the first maximum takes it, ties included)."""
    from caffe_alex.layers.pooling import _MaxPoolInNHWC

    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    kernel, stride, pad = pair(kernel), pair(stride), pair(pad)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).relu().round()  # many ties (zeros and integers)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    top = _MaxPoolInNHWC.apply(ours, kernel, stride, pad, ceil)
    want = F.max_pool2d(ref, kernel, stride, pad, 1, ceil)
    assert top.is_contiguous() and torch.equal(top, want)
    diff = torch.randn(want.shape, generator=gen)
    top.backward(diff)
    want.backward(diff)
    assert torch.equal(ours.grad, ref.grad)
    # and through the layer without a gradient (the maxima only)
    layer = PoolingLayer(_pool_param(kernel, stride, pad, ceil), [shape], "TEST")
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def _pool_param(kernel, stride, pad, ceil):
    from caffe_alex.proto import caffe_pb2

    lp = caffe_pb2.LayerParameter(name="pool", type="Pooling", bottom=["x"], top=["pool"])
    pp = lp.pooling_param
    pp.kernel_h, pp.kernel_w = kernel
    pp.stride_h, pp.stride_w = stride
    pp.pad_h, pp.pad_w = pad
    pp.round_mode = pp.CEIL if ceil else pp.FLOOR
    return lp
