"""ShuffleChannel, ConvolutionDepthwise, DepthwiseConvolution, ReLU6 and Axpy against OpenCV 4
(where it implements them, and after swapping Axpy's data bottoms, which OpenCV reads the other
way round), NumPy transcriptions of the forks' C++ loops (forward and backward) in float64,
and float64 gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import (
    build_error,
    check_runtime_variants,
    compare_with_opencv,
    gradcheck_net,
    opencv_forward,
    parse_net,
    randomize,
    relative_error,
)


def dims(shape) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def one_layer(kind: str, params: str, shape, name: str = "out") -> str:
    return f"""name: "mobile_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}
layer {{ name: "{name}" type: "{kind}" bottom: "data" top: "{name}" {params} }}
"""


def run(text: str, *arrays, phase: str = "TEST", seed: int = 0):
    net = Net(parse_net(text), phase)
    randomize(net, seed)
    feed = dict(zip(net.input_names, (torch.from_numpy(a) for a in arrays), strict=True))
    with torch.no_grad():
        return net, net(**feed)


# ---- ShuffleChannel --------------------------------------------------------------------------


def shuffle_rows(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The fork's Resize_cpu on one sample: block (i * cols + j) goes to (j * rows + i)."""
    flat = data.reshape(rows * cols, -1)
    out = np.empty_like(flat)
    for i in range(rows):
        for j in range(cols):
            out[j * rows + i] = flat[i * cols + j]
    return out.reshape(data.shape)


def fork_shuffle(x: np.ndarray, group: int) -> np.ndarray:
    return np.stack([shuffle_rows(s, group, s.shape[0] // group) for s in x])


def fork_shuffle_backward(top_diff: np.ndarray, group: int) -> np.ndarray:
    # Backward_cpu: the same copy with rows C / group and columns group
    return np.stack([shuffle_rows(s, s.shape[0] // group, group) for s in top_diff])


SHUFFLES = [((2, 12, 3, 4), 3), ((1, 6, 5, 5), 2), ((2, 4, 2, 3), 1), ((1, 5, 2, 2), 5)]


@pytest.mark.parametrize("shape,group", SHUFFLES)
def test_shuffle_channel_matches_opencv(shape, group):
    param = f"shuffle_channel_param {{ group: {group} }}"
    compare_with_opencv(one_layer("ShuffleChannel", param, shape), tol=0)


@pytest.mark.parametrize("shape,group", SHUFFLES)
def test_shuffle_channel_matches_fork_loops_forward_and_backward(shape, group):
    x = np.random.default_rng(0).standard_normal(shape)
    text = one_layer("ShuffleChannel", f"shuffle_channel_param {{ group: {group} }}", shape)
    net = Net(parse_net(text), "TEST")
    xt = torch.from_numpy(x).requires_grad_()
    top = net(data=xt)["out"]
    np.testing.assert_array_equal(top.detach().numpy(), fork_shuffle(x, group))
    top_diff = np.random.default_rng(1).standard_normal(shape)
    top.backward(torch.from_numpy(top_diff))
    np.testing.assert_array_equal(xt.grad.numpy(), fork_shuffle_backward(top_diff, group))


def test_shuffle_channel_gives_a_4d_top_as_the_forks_reshape():
    # The fork's Reshape uses the legacy num/channels/height/width accessors.
    for shape, top in [((2, 6), (2, 6, 1, 1)), ((2, 6, 5), (2, 6, 5, 1))]:
        x = np.random.default_rng(2).standard_normal(shape)
        text = one_layer("ShuffleChannel", "shuffle_channel_param { group: 3 }", shape)
        _, out = run(text, x)
        assert tuple(out["out"].shape) == top
        np.testing.assert_array_equal(out["out"].numpy().reshape(shape), fork_shuffle(x, 3))


def test_shuffle_channel_default_group_is_identity():
    x = np.random.default_rng(3).standard_normal((1, 4, 2, 2))
    _, out = run(one_layer("ShuffleChannel", "", x.shape), x)
    np.testing.assert_array_equal(out["out"].numpy(), x)


def test_shuffle_channel_group_not_dividing_channels_names_file_line_layer_value(tmp_path):
    text = one_layer("ShuffleChannel", "shuffle_channel_param { group: 4 }", (1, 6, 3, 3), "sh")
    error = build_error(tmp_path, text)
    assert (error.file, error.line, error.layer) == (str(tmp_path / "net.prototxt"), 3, "sh")
    assert error.message == (
        "shuffle_channel_param.group 4 does not divide the bottom's 6 channels"
    )
    assert str(error).startswith(f"{tmp_path}/net.prototxt:3: layer 'sh' (ShuffleChannel): ")


@pytest.mark.parametrize(
    "param,shape,message",
    [
        ("shuffle_channel_param { group: 0 }", (1, 4, 2, 2), "group must be greater than 0, got 0"),
        ("", (1, 4, 2, 2, 2), "2 to 4 axes"),
    ],
)
def test_shuffle_channel_config_errors(param, shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(one_layer("ShuffleChannel", param, shape)), "TEST")


# ---- ConvolutionDepthwise and DepthwiseConvolution -------------------------------------------


def fork_depthwise(x, weight, bias, kernel, stride, pad, dilation):
    """farmingyard's ConvolutionDepthwiseLayer::Forward_cpu in float64 (bounds-checked taps)."""
    n, c, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    oh = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    top = np.zeros((n, c, oh, ow))
    for h in range(oh):
        for w in range(ow):
            for i in range(kh):
                for j in range(kw):
                    hi, wi = h * sh - ph + i * dh, w * sw - pw + j * dw
                    if 0 <= hi < height and 0 <= wi < width:
                        top[:, :, h, w] += weight[:, 0, i, j] * x[:, :, hi, wi]
    if bias is not None:
        top += bias[None, :, None, None]
    return top


def geo(kernel, stride=1, pad=0, dilation=1):
    """(kernel, stride, pad, dilation) as (h, w) pairs; an int means both axes."""
    return tuple(v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, pad, dilation))


HW_FORMS = "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"
DEPTHWISE = [  # (bottom shape, convolution_param besides num_output, its geometry)
    ((2, 6, 7, 8), "kernel_size: 3 pad: 1 stride: 2", geo(3, 2, 1)),
    ((1, 4, 6, 6), "kernel_size: 3 pad: 1 bias_term: false", geo(3, 1, 1)),
    ((1, 3, 9, 7), HW_FORMS, geo((3, 2), (2, 1), (1, 0))),
    ((1, 2, 9, 9), "kernel_size: 3 pad: 2 dilation: 2", geo(3, 1, 2, 2)),
    ((2, 3, 5, 6), "kernel_size: 3 kernel_size: 1 pad: 1 pad: 0", geo((3, 1), 1, (1, 0))),
]
# Maps with a side of 1 pixel, where OpenCV's depthwise convolution is wrong: NumPy only.
ONE_PIXEL = [
    ((1, 3, 1, 5), "kernel_size: 3 pad: 1", geo(3, 1, 1)),
    ((2, 2, 1, 1), "kernel_size: 3 pad: 1", geo(3, 1, 1)),
    ((1, 2, 4, 1), "kernel_size: 3 pad: 1 stride: 2", geo(3, 2, 1)),
]


def depthwise_net(kind, shape, params):
    return one_layer(kind, f"convolution_param {{ {params} }}", shape, "dw")


@pytest.mark.parametrize("shape,params,geometry", DEPTHWISE + ONE_PIXEL)
@pytest.mark.parametrize("kind", ["ConvolutionDepthwise", "DepthwiseConvolution"])
def test_depthwise_matches_fork_loops(kind, shape, params, geometry):
    params = f"num_output: {shape[1]} {params}"
    if kind == "DepthwiseConvolution":  # that fork reads group as Convolution does
        params += f" group: {shape[1]}"
    x = np.random.default_rng(4).standard_normal(shape)
    net = Net(parse_net(depthwise_net(kind, shape, params)), "TEST").double()
    randomize(net, 1)
    with torch.no_grad():
        out = net(data=torch.from_numpy(x))["dw"].numpy()
    blobs = [b.detach().numpy() for b in net.params["dw"]]
    bias = blobs[1] if len(blobs) > 1 else None
    expected = fork_depthwise(x, blobs[0], bias, *geometry)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,params,geometry", DEPTHWISE)
def test_convolution_depthwise_matches_opencv(shape, params, geometry):
    params = f"num_output: {shape[1]} {params}"
    compare_with_opencv(depthwise_net("ConvolutionDepthwise", shape, params), tol=2e-6)


@pytest.mark.parametrize(
    "shape,params",
    [
        ((2, 6, 7, 8), "num_output: 6 group: 6 kernel_size: 3 pad: 1 stride: 2"),
        ((1, 4, 6, 5), "num_output: 8 group: 2 kernel_size: 3 pad: 1"),  # the CPU path: any group
        ((1, 3, 5, 5), "num_output: 3 group: 3 kernel_size: 3 dilation: 2 pad: 2"),
    ],
)
def test_depthwise_convolution_matches_opencv_convolution(shape, params):
    # OpenCV has no DepthwiseConvolution: the fork's CPU path is Convolution, which OpenCV has.
    text = depthwise_net("DepthwiseConvolution", shape, params)
    net = Net(parse_net(text), "TEST")
    randomize(net, 2)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(x))["dw"].numpy()
    theirs = opencv_forward(text.replace("DepthwiseConvolution", "Convolution"), net,
                            {"data": x}, ["dw"])["dw"]  # fmt: skip
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) <= 2e-6


def test_convolution_depthwise_ignores_num_output_and_group_and_has_the_forks_blobs():
    text = depthwise_net("ConvolutionDepthwise", (1, 4, 5, 5),
                         "num_output: 7 group: 3 kernel_h: 3 kernel_w: 1 pad: 1")  # fmt: skip
    net = Net(parse_net(text), "TEST")
    assert net.blob_shapes["dw"] == (1, 4, 5, 7)
    assert [tuple(b.shape) for b in net.params["dw"]] == [(4, 1, 3, 1), (4,)]
    text = depthwise_net("DepthwiseConvolution", (1, 4, 5, 5), "num_output: 4 group: 4 "
                         "kernel_size: 3 bias_term: false")  # fmt: skip
    assert [tuple(b.shape) for b in Net(parse_net(text), "TEST").params["dw"]] == [(4, 1, 3, 3)]


@pytest.mark.parametrize("kind", ["ConvolutionDepthwise", "DepthwiseConvolution"])
def test_depthwise_gradcheck(kind):
    params = "num_output: 3 group: 3 kernel_size: 3 pad: 1 stride: 2"
    gradcheck_net(depthwise_net(kind, (2, 3, 5, 4), params))


@pytest.mark.parametrize(
    "shape,params,message",
    [
        ((1, 2, 2, 2), "kernel_size: 5", r"kernel extent 5 is larger than the padded input"),
        ((1, 2, 5), "kernel_size: 3", "4-D"),
        ((1, 2, 5, 5), "kernel_size: 3 axis: 2", "axis 2"),
        ((1, 2, 5, 5), "kernel_size: 3 stride: 0", "stride sizes must be positive"),
    ],
)
def test_convolution_depthwise_errors(shape, params, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(depthwise_net("ConvolutionDepthwise", shape, params)), "TEST")


def test_depthwise_convolution_checks_group_as_convolution():
    text = depthwise_net("DepthwiseConvolution", (1, 4, 5, 5), "num_output: 4 group: 3 "
                         "kernel_size: 3")  # fmt: skip
    with pytest.raises(CaffeAlexError, match=r"multiples of group \(3\)"):
        Net(parse_net(text), "TEST")


# ---- ReLU6 ---------------------------------------------------------------------------------


def test_relu6_matches_opencv():
    compare_with_opencv(one_layer("ReLU6", "", (2, 3, 4, 5)), input_scale=5.0, tol=0)


def test_relu6_values_and_the_forks_gradient_at_0_6_and_nan():
    values = [-2.0, 0.0, 1e-30, 3.0, 6.0 - 1e-6, 6.0, 7.0, float("nan")]
    x = torch.tensor(values, dtype=torch.float64).reshape(1, 8, 1, 1)
    net = Net(parse_net(one_layer("ReLU6", "", (1, 8, 1, 1))), "TEST").double()
    xt = x.clone().requires_grad_()
    top = net(data=xt)["out"]
    want = [0.0, 0.0, 1e-30, 3.0, 6.0 - 1e-6, 6.0, 6.0, float("nan")]
    np.testing.assert_array_equal(top.detach().numpy().ravel(), want)
    top.backward(torch.full_like(top, 2.0))
    # the fork: top_diff * (x > 0 && x < 6)
    expected = np.where((x.numpy() > 0) & (x.numpy() < 6), 2.0, 0.0).ravel()
    np.testing.assert_array_equal(xt.grad.numpy().ravel(), expected)


def relu6_after_conv(top: str) -> str:
    return f"""name: "relu6_test"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ {dims((2, 2, 3, 3))} }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 3 kernel_size: 1 }} }}
layer {{ name: "r6" type: "ReLU6" bottom: "conv" top: "{top}" relu6_param {{ engine: CAFFE }} }}
"""


def test_relu6_in_place_after_a_convolution_gives_the_same_values_and_gradients():
    results = []
    for top in ("conv", "r6"):
        net = Net(parse_net(relu6_after_conv(top)), "TEST").double()
        assert net.layer("r6").in_place == (top == "conv")
        randomize(net, 3, scale=4.0)
        x = torch.from_numpy(np.random.default_rng(6).standard_normal((2, 2, 3, 3)) * 4)
        x.requires_grad_()
        out = net(data=x)[top]
        out.backward(torch.ones_like(out))
        results.append((out.detach().clone(), x.grad.clone(), net.params["conv"][0].grad.clone()))
    assert ((results[0][0] == 0) | (results[0][0] == 6)).any()  # both clamps were exercised
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_relu6_has_no_negative_slope(tmp_path):
    # chuanqi305's ReLU6Parameter holds only the engine: a slope is an unknown field.
    error = build_error(tmp_path, one_layer("ReLU6", "relu6_param { negative_slope: 0.1 }", (1, 1)))
    assert error.line == 3 and 'unknown field "negative_slope"' in error.message


def test_relu6_gradcheck():
    gradcheck_net(one_layer("ReLU6", "", (2, 3, 4, 4)), input_scale=4.0)


# ---- Axpy ----------------------------------------------------------------------------------


def axpy_net(a_shape, x_shape, y_shape=None, order=("a", "x", "y"), name="axpy") -> str:
    y_shape = y_shape or x_shape
    shapes = {"a": a_shape, "x": x_shape, "y": y_shape}
    bottoms = " ".join(f'bottom: "{b}"' for b in order)
    return f"""name: "axpy_test"
layer {{ name: "in" type: "Input" top: "a" top: "x" top: "y"
  input_param {{ {" ".join(f"shape {{ {dims(shapes[k])} }}" for k in "axy")} }} }}
layer {{ name: "{name}" type: "Axpy" {bottoms} top: "out" }}
"""


def fork_axpy(a, x, y):
    """Forward_cpu: copy y, then caffe_axpy(spatial, a[n, c], x[n, c], top[n, c])."""
    n, c = x.shape[:2]
    top = y.copy().reshape(n, c, -1)
    scale, data = a.reshape(n, c), x.reshape(n, c, -1)
    for i in range(n):
        for j in range(c):
            top[i, j] += scale[i, j] * data[i, j]
    return top.reshape(x.shape)


def fork_axpy_backward(a, x, top_diff):
    """Backward_cpu: a_diff = sum over space of top_diff * x; x_diff = a * top_diff;
    y_diff = top_diff."""
    n, c = x.shape[:2]
    a_diff = (top_diff * x).reshape(n, c, -1).sum(axis=2).reshape(a.shape)
    x_diff = a.reshape(n, c, *(1,) * (x.ndim - 2)) * top_diff
    return a_diff, x_diff, top_diff.copy()


AXPYS = [((2, 3, 1, 1), (2, 3, 4, 5)), ((2, 3), (2, 3, 4, 5)), ((1, 4), (1, 4, 6)),
         ((3, 2, 1, 1), (3, 2, 1, 1))]  # fmt: skip


@pytest.mark.parametrize("a_shape,x_shape", AXPYS)
def test_axpy_matches_fork_forward_and_backward(a_shape, x_shape):
    rng = np.random.default_rng(7)
    a, x, y = (rng.standard_normal(s) for s in (a_shape, x_shape, x_shape))
    net = Net(parse_net(axpy_net(a_shape, x_shape)), "TEST")
    leaves = [torch.from_numpy(v).requires_grad_() for v in (a, x, y)]
    top = net(a=leaves[0], x=leaves[1], y=leaves[2])["out"]
    np.testing.assert_allclose(top.detach().numpy(), fork_axpy(a, x, y), rtol=1e-14, atol=1e-14)
    top_diff = rng.standard_normal(x_shape)
    top.backward(torch.from_numpy(top_diff))
    for leaf, want in zip(leaves, fork_axpy_backward(a, x, top_diff), strict=True):
        np.testing.assert_allclose(leaf.grad.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a_shape", [(1, 3, 1, 1), (1, 3)])
def test_axpy_matches_opencv_with_its_data_bottoms_swapped(a_shape):
    # OpenCV's importer computes bottom0 * bottom2 + bottom1: given (a, y, x) it computes the
    # fork's a * x + y, which is what we compute from (a, x, y). (Its scale step fails for a
    # batch of more than 1.)
    x_shape = (1, 3, 4, 5)
    net = Net(parse_net(axpy_net(a_shape, x_shape)), "TEST")
    rng = np.random.default_rng(8)
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in
            zip("axy", (a_shape, x_shape, x_shape), strict=True)}  # fmt: skip
    with torch.no_grad():
        ours = net(**{k: torch.from_numpy(v) for k, v in feed.items()})["out"].numpy()
    swapped = axpy_net(a_shape, x_shape, order=("a", "y", "x"))
    theirs = opencv_forward(swapped, net, feed, ["axpy"])["axpy"]
    assert relative_error(ours, theirs) <= 1e-6
    as_written = opencv_forward(axpy_net(a_shape, x_shape), net, feed, ["axpy"])["axpy"]
    assert relative_error(ours, as_written) > 0.1  # OpenCV's own reading differs


def test_axpy_gradcheck():
    gradcheck_net(axpy_net((2, 3, 1, 1), (2, 3, 3, 2)))


def test_axpy_shape_mismatch_names_file_line_layer_value(tmp_path):
    error = build_error(tmp_path, axpy_net((2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 4), name="se"))
    assert (error.file, error.line, error.layer) == (str(tmp_path / "net.prototxt"), 4, "se")
    assert error.message == (
        "x (bottom 1) shape [2, 3, 4, 5] and y (bottom 2) shape [2, 3, 4, 4] differ"
    )
    assert str(error).startswith(f"{tmp_path}/net.prototxt:4: layer 'se' (Axpy): ")


@pytest.mark.parametrize(
    "a_shape,x_shape,message",
    [
        ((2, 4, 1, 1), (2, 3, 4, 5), r"scale \(bottom 0\) shape \[2, 4, 1, 1\] does not match"),
        ((1, 3, 1, 1), (2, 3, 4, 5), "first two axes"),
        ((2, 3, 2, 1), (2, 3, 4, 5), r"one value per sample and channel .* \[2, 3, 2, 1\]"),
        ((2, 3, 4), (2, 3, 4), r"\[2, 3, 4\]"),
        ((2,), (2, 3), "at least 2 axes"),
    ],
)
def test_axpy_shape_errors(a_shape, x_shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(axpy_net(a_shape, x_shape)), "TEST")


@pytest.mark.parametrize(
    "kind,params,shape",
    [
        ("ShuffleChannel", "shuffle_channel_param { group: 2 }", (2, 4, 3, 3)),
        ("ReLU6", "", (2, 4, 5, 5)),
    ],
)
def test_channels_last_bf16_compile_and_meta(kind, params, shape):
    net = Net(parse_net(one_layer(kind, params, shape)), "TEST")
    check_runtime_variants(net, torch.randn(shape) * 4)
    top = net.to("meta")(data=torch.empty(shape, device="meta"))["out"]
    assert top.device.type == "meta" and tuple(top.shape) == net.blob_shapes["out"]
