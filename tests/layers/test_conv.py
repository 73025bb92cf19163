"""Convolution and Deconvolution against OpenCV 4 and NumPy transcriptions of Caffe's formulas."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net, randomize


def conv_net(
    params: str, shape=(2, 4, 7, 7), kind="Convolution", bottoms=("data",), tops=("out",)
) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    inputs = " ".join(f'top: "{b}"' for b in bottoms)
    wiring = (
        " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(f'top: "{t}"' for t in tops)
    )
    return f"""name: "conv_test"
layer {{ name: "data" type: "Input" {inputs} input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "{tops[0]}" type: "{kind}" {wiring} convolution_param {{ {params} }} }}
"""


def _window(x, start, kernel, stride, dilation, out):
    index = tuple(
        slice(s + k * d, s + k * d + (o - 1) * st + 1, st)
        for s, k, st, d, o in zip(start, kernel, stride, dilation, out, strict=True)
    )
    return x[(Ellipsis, *index)]


def caffe_conv(x, w, b, stride, pad, dilation, group):
    """Caffe's convolution: out[n, o, p] = sum over the group's channels and kernel taps of
    w[o, c, t] * x_padded[n, c, p * stride + t * dilation] (+ bias); any number of axes."""
    n_sp, kernel = x.ndim - 2, w.shape[2:]
    extent = [dilation[i] * (kernel[i] - 1) + 1 for i in range(n_sp)]
    # Caffe's int division truncates toward zero; its im2col reads zeros outside the image.
    out_size = [int((x.shape[2 + i] + 2 * pad[i] - extent[i]) / stride[i]) + 1 for i in range(n_sp)]
    x = np.pad(
        x,
        [(0, 0), (0, 0)]
        + [
            (p, p + max(0, e - n - 2 * p)) for p, e, n in zip(pad, extent, x.shape[2:], strict=True)
        ],
    )
    out = np.zeros((x.shape[0], w.shape[0], *out_size))
    cin, cout = w.shape[1], w.shape[0] // group
    for g in range(group):
        xg, wg = x[:, g * cin : (g + 1) * cin], w[g * cout : (g + 1) * cout]
        for tap in itertools.product(*[range(k) for k in kernel]):
            patch = _window(xg, (0,) * n_sp, tap, stride, dilation, out_size)
            out[:, g * cout : (g + 1) * cout] += np.einsum(
                "nc...,oc->no...", patch, wg[(Ellipsis, *tap)]
            )
    if b is not None:
        out += b.reshape((1, -1) + (1,) * n_sp)
    return out


def caffe_deconv(x, w, b, stride, pad, dilation, group):
    """Caffe's deconvolution (col2im of the convolution's backward): every input pixel adds
    x[n, c, i] * w[c, o, t] at output position i * stride + t * dilation - pad."""
    n_sp = x.ndim - 2
    kernel = w.shape[2:]
    full = [
        stride[i] * (x.shape[2 + i] - 1) + dilation[i] * (kernel[i] - 1) + 1 for i in range(n_sp)
    ]
    cin, cout = x.shape[1] // group, w.shape[1]
    out = np.zeros((x.shape[0], cout * group, *full))
    for g in range(group):
        xg, wg = x[:, g * cin : (g + 1) * cin], w[g * cin : (g + 1) * cin]
        for tap in itertools.product(*[range(k) for k in kernel]):
            index = tuple(
                slice(t * d, t * d + (n - 1) * s + 1, s)
                for t, d, s, n in zip(tap, dilation, stride, x.shape[2:], strict=True)
            )
            out[(slice(None), slice(g * cout, (g + 1) * cout), *index)] += np.einsum(
                "nc...,co->no...", xg, wg[(Ellipsis, *tap)]
            )
    crop = tuple(slice(p, f - p) for p, f in zip(pad, full, strict=True))
    out = out[(slice(None), slice(None), *crop)]
    if b is not None:
        out = out + b.reshape((1, -1) + (1,) * n_sp)
    return out


def run_against_numpy(text, reference, stride, pad, dilation, group, axis_shape=None):
    net = Net(parse_net(text), "TEST").double()
    randomize(net, seed=1)
    x = torch.randn(net.blob_shapes["data"], dtype=torch.float64)
    out = net(data=x)["out"].detach().numpy()
    blobs = [p.detach().numpy() for p in net.params[net.layer_names[1]]]
    xn = x.numpy() if axis_shape is None else x.numpy().reshape(axis_shape)
    want = reference(
        xn, blobs[0], blobs[1] if len(blobs) > 1 else None, stride, pad, dilation, group
    )
    np.testing.assert_allclose(out, want.reshape(out.shape), rtol=1e-10, atol=1e-10)
    return out


# (input shape, params): stride 2 on odd sizes, non-dividing strides, kernel_h != kernel_w,
# pad_h/pad_w, dilation, groups (2 and depthwise), no bias.
CONV_CASES = [
    ((2, 4, 7, 7), "num_output: 6 kernel_size: 3"),
    ((2, 4, 9, 9), "num_output: 6 kernel_size: 3 stride: 2 pad: 1"),
    ((1, 4, 10, 9), "num_output: 5 kernel_size: 4 stride: 3 pad: 2"),
    (
        (1, 4, 9, 8),
        "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
    ),
    (
        (1, 4, 9, 11),
        "num_output: 3 kernel_size: 3 kernel_size: 5 stride: 1 stride: 2 pad: 0 pad: 2",
    ),
    ((1, 4, 11, 11), "num_output: 4 kernel_size: 3 dilation: 2 pad: 2"),
    ((1, 4, 12, 11), "num_output: 4 kernel_size: 3 dilation: 3 stride: 2"),
    ((2, 4, 7, 7), "num_output: 6 kernel_size: 3 group: 2"),
    ((2, 4, 8, 8), "num_output: 4 kernel_size: 3 group: 4 pad: 1 stride: 2"),
    ((2, 4, 8, 8), "num_output: 8 kernel_size: 3 group: 4 pad: 1"),
    ((2, 4, 7, 7), "num_output: 6 kernel_size: 1 bias_term: false"),
]
# Caffe-only: the kernel is 1 wider than the image but stride 2 still gives one output.
NUMPY_CONV_CASES = [((1, 2, 2, 5), "num_output: 3 kernel_size: 3 stride: 2")]
DECONV_CASES = [
    ((2, 4, 5, 5), "num_output: 3 kernel_size: 3"),
    ((2, 4, 5, 6), "num_output: 3 kernel_size: 4 stride: 2 pad: 1"),
    ((1, 4, 5, 5), "num_output: 2 kernel_size: 3 stride: 3 pad: 2"),
    (
        (1, 4, 4, 5),
        "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
    ),
    ((1, 4, 5, 5), "num_output: 4 kernel_size: 3 dilation: 2 stride: 2"),
    ((2, 4, 5, 5), "num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2"),
    ((2, 4, 5, 5), "num_output: 4 kernel_size: 3 stride: 2 group: 4 bias_term: false"),
]


def _geometry(text):
    cp = parse_net(text).layer[1].convolution_param
    net = Net(parse_net(text), "TEST")
    layer = net.layer(net.layer_names[1])
    return layer.stride, layer.pad, layer.dilation, cp.group


@pytest.mark.parametrize("shape,params", CONV_CASES)
def test_convolution_matches_opencv_and_numpy(shape, params):
    text = conv_net(params, shape)
    compare_with_opencv(text, tol=1e-5)
    run_against_numpy(text, caffe_conv, *_geometry(text))


@pytest.mark.parametrize("shape,params", NUMPY_CONV_CASES)
def test_convolution_truncating_size_rule(shape, params):
    text = conv_net(params, shape)
    assert run_against_numpy(text, caffe_conv, *_geometry(text)).shape == (1, 3, 1, 2)


@pytest.mark.parametrize("shape,params", DECONV_CASES)
def test_deconvolution_matches_opencv_and_numpy(shape, params):
    text = conv_net(params, shape, kind="Deconvolution")
    if "dilation" not in params:  # OpenCV's Caffe importer ignores deconvolution dilation
        compare_with_opencv(text, tol=1e-5)
    run_against_numpy(text, caffe_deconv, *_geometry(text))


@pytest.mark.parametrize(
    "kind,reference", [("Convolution", caffe_conv), ("Deconvolution", caffe_deconv)]
)
@pytest.mark.parametrize(
    "shape,params",
    [
        ((2, 4, 9), "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2"),
        (
            (1, 2, 5, 6, 4),
            "num_output: 4 kernel_size: 3 kernel_size: 2 kernel_size: 3 stride: 2 pad: 1",
        ),
    ],
)
def test_1d_and_3d(kind, reference, shape, params):
    text = conv_net(params, shape, kind=kind)
    run_against_numpy(text, reference, *_geometry(text))


def test_axis_flattens_leading_axes_into_batch():
    # axis 2 on a 5-D bottom: axes 0 and 1 together are the batch, 2 spatial axes follow.
    text = conv_net("num_output: 3 kernel_size: 3 stride: 2 axis: 2", shape=(2, 3, 4, 7, 6))
    out = run_against_numpy(text, caffe_conv, *_geometry(text), axis_shape=(6, 4, 7, 6))
    assert out.shape == (2, 3, 3, 3, 2)


def test_several_bottoms_share_the_weights():
    text = conv_net("num_output: 3 kernel_size: 3", bottoms=("a", "b"), tops=("ya", "yb"))
    net = Net(parse_net(text), "TEST")
    randomize(net)
    a, b = torch.randn(2, 4, 7, 7), torch.randn(2, 4, 7, 7)
    out = net(a=a, b=b)
    assert torch.allclose(out["yb"], net(a=b, b=a)["ya"])


@pytest.mark.parametrize(
    "kind,weight_shape", [("Convolution", (6, 2, 3, 2)), ("Deconvolution", (4, 3, 3, 2))]
)
def test_blob_layout_and_fillers(kind, weight_shape):
    params = (
        "num_output: 6 kernel_h: 3 kernel_w: 2 group: 2 "
        "weight_filler { type: 'constant' value: 0.5 } "
        "bias_filler { type: 'constant' value: 0.1 }"
    )
    net = Net(parse_net(conv_net(params, kind=kind)), "TEST")
    weight, bias = net.params[net.layer_names[1]]
    assert tuple(weight.shape) == weight_shape and tuple(bias.shape) == (6,)
    assert torch.all(weight == 0.5) and torch.all(bias == np.float32(0.1))
    net = Net(
        parse_net(
            conv_net(
                "num_output: 6 kernel_size: 3 weight_filler { type: 'xavier' } bias_term: false",
                kind=kind,
            )
        ),
        "TEST",
    )
    (weight,) = net.params[net.layer_names[1]]
    limit = np.sqrt(3.0 / (weight.numel() / weight.shape[0]))  # Caffe's fan_in: count / shape[0]
    assert 0 < weight.abs().max() <= limit and weight.std() > limit / 4


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize(
    "params",
    [
        "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2",
        "num_output: 2 kernel_h: 2 kernel_w: 3 dilation: 2",
    ],
)
def test_gradcheck(kind, params):
    gradcheck_net(conv_net(params, shape=(1, 2, 4, 5), kind=kind))


@pytest.mark.parametrize(
    "params,message",
    [
        ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", "kernel_size or kernel_h"),
        ("num_output: 4 kernel_size: 3 pad: 1 pad_h: 1", "pad or pad_h"),
        ("num_output: 4 kernel_size: 3 stride: 1 stride_w: 1", "stride or stride_h"),
        ("num_output: 4", "kernel_size must be given"),
        ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", "once per spatial axis"),
        ("num_output: 4 kernel_h: 3", "kernel sizes must be positive"),
        ("num_output: 4 kernel_size: 3 group: 3", "multiples of group"),
        ("num_output: 3 kernel_size: 3 group: 2", "multiples of group"),
        ("kernel_size: 3", "num_output"),
        ("num_output: 4 kernel_size: 9", "empty"),
        ("num_output: 4 kernel_size: 3 dilation: 0", "dilation"),
    ],
)
def test_config_errors(params, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(conv_net(params)), "TEST")


def test_hw_forms_are_2d_only_and_channels_are_fixed():
    with pytest.raises(CaffeAlexError, match="2-D"):
        Net(parse_net(conv_net("num_output: 2 kernel_h: 3 kernel_w: 3", shape=(1, 2, 5))), "TEST")
    net = Net(parse_net(conv_net("num_output: 2 kernel_size: 3")), "TEST")
    with pytest.raises(CaffeAlexError, match="4 channels"):
        net(data=torch.randn(2, 3, 7, 7))
    assert net(data=torch.randn(1, 4, 9, 5))["out"].shape == (1, 2, 7, 3)


class _ConvInputStrides(torch.utils._python_dispatch.TorchDispatchMode):
    """The strides of each convolution's input, as the kernel sees them."""

    def __init__(self):
        super().__init__()
        self.strides = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.strides.append(args[0].stride())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch,grad,nhwc", [(4, True, True), (4, False, False),
                                             (128, True, False)])  # fmt: skip
def test_a_single_channel_convolution_learns_in_nhwc_below_batch_128(batch, grad, nhwc):
    """oneDNN's NCHW weight gradient for one input channel is slow below batch 128 (conv.py):
    there the layer runs on an NHWC view of the same memory. Same numbers as the NCHW
    convolution up to summation order, top back in NCHW order; no view without a gradient to
    record, nor from batch 128."""
    import torch.nn.functional as F

    net = Net(parse_net(conv_net("num_output: 6 kernel_size: 3 stride: 2 pad: 1",
                                 shape=(batch, 1, 9, 9))))  # fmt: skip
    randomize(net, seed=1)
    layer = net.layer("out")
    x = torch.randn(batch, 1, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad), _ConvInputStrides() as seen:
        top = layer(x)
    assert seen.strides == [(81, 1, 9, 1) if nhwc else (81, 81, 9, 1)]
    assert top.is_contiguous()
    weight, bias = (b.detach().clone().requires_grad_() for b in layer.blobs)
    want = F.conv2d(x, weight, bias, 2, 1)
    torch.testing.assert_close(top, want, rtol=1e-5, atol=1e-5)
    if grad:
        diff = torch.randn_like(top)
        top.backward(diff)
        want.backward(diff)
        torch.testing.assert_close(layer.blobs[0].grad, weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.blobs[1].grad, bias.grad, rtol=1e-5, atol=1e-5)
