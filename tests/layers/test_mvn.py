"""MVN against a NumPy transcription of Caffe's mvn_layer.cpp (forward and its backward formula,
step by step in float32), float64 gradcheck, and OpenCV 4 (which implements "MVN")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import (
    check_runtime_variants,
    compare_with_opencv,
    gradcheck_net,
    opencv_forward,
    parse_net,
)


def mvn_net(params: str = "", shape=(2, 3, 4, 5)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "mvn_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" type: "MVN" bottom: "data" top: "out" mvn_param {{ {params} }} }}
"""


def caffe_mvn(x, dy, normalize_variance=True, across_channels=False, eps=1e-9):
    """MVNLayer::Forward_cpu and Backward_cpu in float32, one BLAS call at a time."""
    f32 = np.float32
    shape4 = tuple(x.shape) + (1,) * (4 - x.ndim)
    n, c = shape4[0], shape4[1]
    num = n if across_channels else n * c
    dim = x.size // num
    xs, dys = x.astype(f32).reshape(num, dim), dy.astype(f32).reshape(num, dim)
    inv = f32(1.0 / dim)
    mean = xs.sum(axis=1, dtype=f32) * inv  # gemv with alpha 1/dim
    top = xs + (-mean)[:, None]
    if not normalize_variance:
        back = dys + (-(dys.sum(axis=1, dtype=f32) * inv))[:, None]
        return top.reshape(shape4), back.reshape(x.shape)
    var = (top * top).sum(axis=1, dtype=f32) * inv  # E[(x - Ex)^2]
    std = np.power(var, f32(0.5)) + f32(eps)  # eps on the standard deviation
    top = top / std[:, None]
    back = top * dys
    back = np.broadcast_to(back.sum(axis=1, dtype=f32)[:, None], back.shape)
    back = top * back
    back = back + dys.sum(axis=1, dtype=f32)[:, None]
    back = dys + f32(-1.0 / dim) * back  # axpby(1, top_diff, -1/dim, bottom_diff)
    back = back / std[:, None]
    return top.reshape(shape4), back.reshape(x.shape)


def run(params, x, dy):
    net = Net(parse_net(mvn_net(params, x.shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy).reshape(y.shape))
    return y.detach().numpy(), xt.grad.numpy()


CASES = [  # (mvn_param, normalize_variance, across_channels, eps)
    ("", True, False, 1e-9),
    ("across_channels: true", True, True, 1e-9),
    ("normalize_variance: false", False, False, 1e-9),
    ("normalize_variance: false across_channels: true", False, True, 1e-9),
    ("eps: 0.5", True, False, np.float32(0.5)),
    ("eps: 0.001 across_channels: true", True, True, np.float32(0.001)),
]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 6), (4, 7), (6,)])
@pytest.mark.parametrize("params,nv,across,eps", CASES)
def test_forward_and_backward_match_caffe(shape, params, nv, across, eps):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, grad = run(params, x, dy)
    want_y, want_grad = caffe_mvn(x, dy, nv, across, eps)
    assert y.shape == want_y.shape
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=5e-6)


def test_top_takes_the_legacy_four_axes():
    # Caffe reshapes the top with num/channels/height/width: fewer axes come back as 4.
    for shape, want in [((4, 7), (4, 7, 1, 1)), ((3, 4, 6), (3, 4, 6, 1)), ((6,), (6, 1, 1, 1))]:
        assert Net(parse_net(mvn_net("", shape))).blob_shapes["out"] == want


def test_more_than_four_axes_is_refused():
    with pytest.raises(CaffeAlexError, match=r"layer 'out' \(MVN\).*at most 4 axes"):
        Net(parse_net(mvn_net("", (2, 3, 2, 2, 2))))


def test_caffe_backward_is_not_autograd_when_eps_is_large():
    # Caffe divides by (std + eps) as if it were the std; autograd differentiates std + eps.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, grad = run("eps: 0.5", x, dy)
    xt = torch.from_numpy(x).double().requires_grad_()
    rows = xt.reshape(6, 16)
    centred = rows - rows.mean(1, keepdim=True)
    y = centred / (centred.pow(2).mean(1, keepdim=True).sqrt() + 0.5)
    y.backward(torch.from_numpy(dy).double().reshape(6, 16))
    assert np.abs(grad - xt.grad.numpy()).max() > 1e-2
    np.testing.assert_allclose(grad, caffe_mvn(x, dy, eps=np.float32(0.5))[1], rtol=1e-4, atol=5e-6)


def test_constant_rows_stay_finite():
    # std 0: forward 0 / eps = 0, backward (dy - mean(dy)) / eps (autograd's sqrt would be inf).
    x = np.full((1, 2, 3, 3), 4.0, np.float32)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    y, grad = run("eps: 0.25", x, dy)
    assert np.all(y == 0)
    rows = dy.reshape(2, 9)
    want = (rows - rows.mean(1, keepdims=True)) / np.float32(0.25)
    np.testing.assert_allclose(grad, want.reshape(x.shape), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(run("", x, dy)[1]))


@pytest.mark.parametrize(
    "params",
    ["", "across_channels: true", "normalize_variance: false", "normalize_variance: false eps: 1"],
)
def test_gradcheck(params):
    # With the default eps Caffe's formula is autograd's to within 1e-9 relative (a large eps
    # is covered by the transcription above); without variance scaling eps plays no part.
    gradcheck_net(mvn_net(params, (2, 3, 2, 3)))


@pytest.mark.parametrize("params", ["", "across_channels: true", "normalize_variance: false"])
def test_matches_opencv(params):
    compare_with_opencv(mvn_net(params), tol=1e-5)


def test_opencv_adds_eps_to_the_variance_caffe_to_the_std():
    # Why the OpenCV comparison keeps the default eps: OpenCV divides by sqrt(var + eps).
    text = mvn_net("eps: 0.5 across_channels: true")
    net = Net(parse_net(text))
    x = np.random.default_rng(10).standard_normal((2, 3, 4, 5)).astype(np.float32)
    ours = net(data=torch.from_numpy(x))["out"].numpy()
    theirs = opencv_forward(text, net, {"data": x}, ["out"])["out"]
    want = caffe_mvn(x, x, eps=np.float32(0.5), across_channels=True)[0]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    assert np.abs(ours - theirs).max() > 1e-2


@pytest.mark.slow
def test_float64_and_runtime_variants():
    net = Net(parse_net(mvn_net("")))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    y64 = net.double()(data=x.double())["out"]
    assert y64.dtype == torch.float64
    net.float()
    torch.testing.assert_close(net(data=x)["out"], y64.float(), rtol=1e-5, atol=1e-5)
    check_runtime_variants(net, x)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    net = Net(parse_net(mvn_net("across_channels: true")))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for device in ("cpu", "cuda"):
        net.to(device)
        xt = x.to(device).requires_grad_()
        y = net(data=xt)["out"]
        (y * torch.arange(y.numel(), device=device).reshape(y.shape)).sum().backward()
        results.append((y.detach().cpu(), xt.grad.cpu()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
