"""SmoothL1Loss ("SmoothL1Loss", caffe_alex/layers/smooth_l1.py) against a NumPy transcription
of caffe-fast-rcnn's smooth_L1_loss_layer.cu forward and backward, float64 gradcheck, and its
configuration errors. OpenCV has no such layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import parse_net


def smooth_l1_net(shape, bottoms: int = 4, sigma: float | None = None, extra: str = "") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    names = ["x", "t", "w_in", "w_out"][:bottoms]
    tops = " ".join(f'top: "{n}"' for n in names)
    shapes = " ".join(f"shape {{ {dims} }}" for _ in names)
    bottom = " ".join(f'bottom: "{n}"' for n in names)
    param = "" if sigma is None else f"smooth_l1_loss_param {{ sigma: {sigma} }}"
    return f"""name: "smooth_l1"
layer {{ name: "in" type: "Input" {tops} input_param {{ {shapes} }} }}
layer {{ name: "loss" type: "SmoothL1Loss" {bottom} top: "loss" {param} {extra} }}
"""


def fork_smooth_l1(x, t, w_in=None, w_out=None, sigma=1.0, top_diff=1.0):
    """The fork's kernels: d = w_in (x - t); f(d) = 0.5 d^2 sigma^2 if |d| < 1/sigma^2 else
    |d| - 0.5/sigma^2; loss = sum(w_out f(d)) / num; f'(d) = sigma^2 d or sign(d); bottom i's
    diff = +-top_diff / num * f'(d) * w_in * w_out (the weights get none)."""
    sigma2 = np.float32(sigma) * np.float32(sigma)
    d = (x - t).astype(np.float64)
    if w_in is not None:
        d = d * w_in
    small = np.abs(d) < 1.0 / sigma2
    errors = np.where(small, 0.5 * d * d * sigma2, np.abs(d) - 0.5 / sigma2)
    if w_out is not None:
        errors = errors * w_out
    num = x.shape[0]
    slope = np.where(small, sigma2 * d, np.sign(d))
    grads = []
    for sign in (1, -1):
        g = sign * top_diff / num * slope
        if w_in is not None:
            g = g * w_in * w_out
        grads.append(g)
    return errors.sum() / num, grads


@pytest.mark.parametrize(("bottoms", "sigma"), [(2, None), (4, None), (4, 3.0), (2, 0.5)])
def test_forward_and_backward_match_the_fork(bottoms, sigma):
    rng = np.random.default_rng(bottoms)
    shape = (6, 8, 3, 2)
    x = rng.standard_normal(shape).astype(np.float32) * 1.5
    t = rng.standard_normal(shape).astype(np.float32)
    weights = [(rng.uniform(0, 2, shape) * (rng.uniform(size=shape) > 0.3)).astype(np.float32)
               for _ in range(2)]  # fmt: skip
    net = Net(parse_net(smooth_l1_net(shape, bottoms, sigma)), "TRAIN")
    feed = {"x": x, "t": t, "w_in": weights[0], "w_out": weights[1]}
    leaves = {k: torch.from_numpy(v).requires_grad_() for k, v in feed.items()}
    net(**{k: leaves[k] for k in list(feed)[:bottoms]})
    assert net.loss is not None  # a loss: loss_weight 1 by default
    used = [feed["w_in"], feed["w_out"]] if bottoms == 4 else [None, None]
    loss, (gx, gt) = fork_smooth_l1(x, t, *used, sigma=sigma or 1.0, top_diff=2.5)
    np.testing.assert_allclose(net.blobs["loss"].item(), loss, rtol=1e-5)
    (net.loss * 2.5).backward()
    np.testing.assert_allclose(leaves["x"].grad.numpy(), gx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(leaves["t"].grad.numpy(), gt, rtol=1e-5, atol=1e-7)
    if bottoms == 4:
        assert leaves["w_in"].grad is None and leaves["w_out"].grad is None


def test_gradcheck_with_weights():
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4, 2)
    x, t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    w_in, w_out = (torch.rand(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    net = Net(parse_net(smooth_l1_net(shape, 4, 2.0)), "TRAIN").double()

    def loss(a, b):
        return net(x=a, t=b, w_in=w_in, w_out=w_out)["loss"]

    assert torch.autograd.gradcheck(loss, (x.requires_grad_(), t.requires_grad_()), eps=1e-6)


def test_loss_weight_scales_the_net_loss():
    shape = (2, 4)
    net = Net(parse_net(smooth_l1_net(shape, 2, extra="loss_weight: 3")), "TRAIN")
    x, t = torch.randn(shape), torch.randn(shape)
    net(x=x, t=t)
    torch.testing.assert_close(net.loss, 3 * net.blobs["loss"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (smooth_l1_net((2, 4), 3), "must specify both inside and outside weights"),
        (
            # the predictions (first shape) [2, 5], the targets [2, 4]
            smooth_l1_net((2, 4), 2).replace("dim: 2 dim: 4 }", "dim: 2 dim: 5 }", 1),
            "targets [2, 4] must match the predictions [2, 5]",
        ),
        (smooth_l1_net((2, 4), 2, sigma=0), "sigma must not be 0"),
    ],
)  # fmt: skip
def test_configuration_errors(tmp_path, text, needle):
    path = tmp_path / "loss.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path), phase="TRAIN")
    assert needle in str(info.value) and "layer 'loss' (SmoothL1Loss)" in str(info.value)
