"""BatchNorm against OpenCV 4 (global statistics) and a NumPy transcription of Caffe's
batch_norm_layer.cpp (batch statistics, the decayed running sums, the backward formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net, randomize


def bn_net(params: str = "", shape=(2, 3, 4, 5), extra: str = "") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "y" type: "BatchNorm" bottom: "x" top: "y" {extra}
  batch_norm_param {{ {params} }} }}
"""


def caffe_bn(x, mean_blob, var_blob, s, eps, fraction, global_stats):
    """Returns (top, new blobs) as Caffe computes them, in float64."""
    x = np.asarray(x, np.float64)
    c = 1 if x.ndim == 1 else x.shape[1]
    xc = x.reshape(x.shape[0], c, -1)
    if global_stats:
        factor = 0.0 if s == 0 else 1.0 / s
        mean, var = mean_blob * factor, var_blob * factor
        blobs = (mean_blob, var_blob, s)
    else:
        mean = xc.mean(axis=(0, 2))
        var = ((xc - mean[None, :, None]) ** 2).mean(axis=(0, 2))
        m = x.size // c
        correction = m / (m - 1) if m > 1 else 1.0
        blobs = (
            fraction * mean_blob + mean,
            fraction * var_blob + correction * var,
            fraction * s + 1,
        )
    top = (xc - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps)
    return top.reshape(x.shape), blobs


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 4), (2, 3, 6), (1, 2, 3, 2, 2)])
@pytest.mark.parametrize("params", ["", "eps: 0.01", "use_global_stats: true"])
def test_global_stats_match_opencv(shape, params):
    # randomize() gives s in [0.5, ...), so the stored sums really are divided by s != 1.
    compare_with_opencv(bn_net(params, shape), tol=1e-5)


def run(net, x):
    return net(x=torch.as_tensor(x, dtype=torch.float32))["y"].detach().numpy()


def blobs_of(net):
    return [b.detach().numpy().astype(np.float64) for b in net.params["y"]]


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (6, 2), (1, 3, 1, 1), (3,)])
@pytest.mark.parametrize("fraction", [0.999, 0.5])
def test_train_batch_stats_and_running_update(shape, fraction):
    net = Net(parse_net(bn_net(f"moving_average_fraction: {fraction}", shape)), "TRAIN")
    randomize(net, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(2):  # the second forward checks the decayed sums accumulate
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        mean_blob, var_blob, s = blobs_of(net)
        want, want_blobs = caffe_bn(x, mean_blob, var_blob, s[0], 1e-5, fraction, False)
        np.testing.assert_allclose(run(net, x), want, rtol=1e-4, atol=1e-5)
        for got, expected in zip(blobs_of(net), want_blobs, strict=True):
            np.testing.assert_allclose(got, np.reshape(expected, got.shape), rtol=1e-5)


def test_zero_scale_factor_means_zero_stats():
    net = Net(parse_net(bn_net("eps: 0.25")), "TEST")
    with torch.no_grad():
        net.params["y"][0].fill_(3.0)
        net.params["y"][1].fill_(5.0)  # ignored: s == 0 makes mean and variance 0
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(run(net, x), x / 0.5, rtol=1e-6)


def test_test_phase_uses_batch_stats_when_asked_and_train_can_use_global():
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2)).astype(np.float32)
    net = Net(parse_net(bn_net("use_global_stats: false", x.shape)), "TEST")
    want, _ = caffe_bn(x, np.zeros(2), np.zeros(2), 0.0, 1e-5, 0.999, False)
    np.testing.assert_allclose(run(net, x), want, rtol=1e-4, atol=1e-5)
    net = Net(parse_net(bn_net("use_global_stats: true", x.shape)), "TRAIN")
    randomize(net)
    before = blobs_of(net)
    want, _ = caffe_bn(x, *before[:2], before[2][0], 1e-5, 0.999, True)
    np.testing.assert_allclose(run(net, x), want, rtol=1e-5, atol=1e-6)
    for got, old in zip(blobs_of(net), before, strict=True):
        np.testing.assert_array_equal(got, old)


@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (4, 3)])
def test_train_backward_matches_caffe_formula(shape):
    net = Net(parse_net(bn_net("", shape)), "TRAIN").double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = net(x=x)["y"]
    (dx,) = torch.autograd.grad(y, x, dy)
    # Caffe: dx = (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps), means per channel.
    dims = [d for d in range(len(shape)) if d != 1]
    var = x.detach().var(dim=dims, correction=0, keepdim=True)
    yd = y.detach()
    want = (dy - dy.mean(dims, keepdim=True) - (dy * yd).mean(dims, keepdim=True) * yd) / (
        var + 1e-5
    ).sqrt()
    torch.testing.assert_close(dx, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("shape", [(3, 2, 2, 1), (4, 3)])
def test_gradcheck(phase, shape):
    gradcheck_net(bn_net("", shape), phase=phase)


def test_blobs_are_not_learnable():
    net = Net(parse_net(bn_net()), "TRAIN")
    assert [tuple(b.shape) for b in net.params["y"]] == [(3,), (3,), (1,)]
    assert not any(b.requires_grad for b in net.params["y"])
    assert all(info.lr_mult == 0 for info in net.param_infos)


def test_explicit_zero_lr_specs_are_fine_but_learning_is_refused():
    zero = "param { lr_mult: 0 } " * 3
    Net(parse_net(bn_net("", extra=zero)), "TRAIN")
    with pytest.raises(CaffeAlexError, match="lr_mult 1"):
        Net(parse_net(bn_net("", extra="param { lr_mult: 0 } param { decay_mult: 0 }")), "TRAIN")


def test_channel_mismatch_on_reshape():
    net = Net(parse_net(bn_net()), "TEST")
    with pytest.raises(CaffeAlexError, match="4 channels"):
        net(x=torch.zeros(2, 4, 4, 5))
