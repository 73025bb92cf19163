"""Power against OpenCV 4, a NumPy transcription of Caffe's forward and backward (special
cases included), and float64 gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.net import Net
from tests.reference import check_runtime_variants, compare_with_opencv, gradcheck_net, parse_net


def power_net(params: str, shape=(2, 3, 4, 5)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "power_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" type: "Power" bottom: "data" top: "out" power_param {{ {params} }} }}
"""


def caffe_power(x, power, scale, shift):
    """Caffe's PowerLayer forward and d(top)/d(bottom), step by step in float32."""
    x = x.astype(np.float32)
    power, scale, shift = np.float32(power), np.float32(scale), np.float32(shift)
    diff_scale = power * scale
    if diff_scale == 0:
        value = np.float32(1) if power == 0 else np.power(shift, power)
        return np.full_like(x, value), np.zeros_like(x)
    base = x * scale if scale != 1 else x.copy()
    base = base + shift if shift != 0 else base
    y = np.power(base, power) if power != 1 else base
    if power == 1:
        return y, np.full_like(x, diff_scale)
    if power == 2:
        grad = diff_scale * scale * x + (diff_scale * shift if shift != 0 else 0)
    elif shift == 0:
        grad = y / x * power
    else:
        grad = y / base * diff_scale
    return y, grad.astype(np.float32)


CASES = [  # (power, scale, shift)
    (2.0, 1.0, 0.0),
    (2.0, 0.5, 1.0),
    (3.0, 2.0, -0.5),
    (0.5, 1.0, 10.0),
    (-1.0, 0.5, 4.0),
    (1.0, 2.0, 3.0),
    (1.0, 1.0, 0.0),
    (-0.75, 2.0, 7.0),
    (1.5, 3.0, 0.0),
    (0.0, 2.0, 3.0),
    (2.0, 0.0, 3.0),
    (-2.0, 0.0, 0.5),
]


def params_of(power, scale, shift):
    return f"power: {power} scale: {scale} shift: {shift}"


@pytest.mark.parametrize("power,scale,shift", [c for c in CASES if c != (1.5, 3.0, 0.0)])
def test_matches_opencv(power, scale, shift):
    # OpenCV's Power has Caffe's fields; keep the base positive for fractional powers (the
    # random inputs here are signed, so 1.5 with shift 0 would be NaN on both sides).
    scale_in = 1.0 if power == int(power) else 0.2
    errors = compare_with_opencv(
        power_net(params_of(power, scale, shift)), input_scale=scale_in, tol=1e-6
    )
    assert errors


@pytest.mark.parametrize("power,scale,shift", CASES)
def test_forward_and_backward_match_caffe(power, scale, shift):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 3, 4, 5)) * (0.2 if power != int(power) else 1)).astype(np.float32)
    if power != int(power) and shift == 0:
        x = np.abs(x) + 0.1
    dy = rng.standard_normal(x.shape).astype(np.float32)
    net = Net(parse_net(power_net(params_of(power, scale, shift))))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy))
    ref_y, ref_grad = caffe_power(x, power, scale, shift)
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), dy * ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "power,scale,shift",
    [
        (2.0, 0.5, 1.0),
        (3.0, 2.0, -0.5),
        (-1.0, 0.5, 4.0),
        (1.5, 3.0, 0.0),
        (1.0, 2.0, 3.0),
        (0.0, 2.0, 3.0),
        (2.0, 0.0, 3.0),
    ],
)
def test_gradcheck(power, scale, shift):
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64) + 0.5
    gradcheck_net(
        power_net(params_of(power, scale, shift), (2, 3, 2, 2)),
        inputs={"data": x},
        check_inputs=["data"],
    )


def test_caffe_gradients_where_the_base_is_zero():
    # shift 0: Caffe's power * y / x is NaN at x == 0 (autograd would say 0 for power 3).
    net = Net(parse_net(power_net("power: 3 scale: 2", (1, 3))))
    x = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    net(data=x)["out"].sum().backward()
    assert torch.isnan(x.grad[0, 0])
    torch.testing.assert_close(x.grad[0, 1:], torch.tensor([24.0, 24.0]))
    # constant output (power 0): exactly zero gradient, even for a non-finite top diff
    net = Net(parse_net(power_net("power: 0 scale: 2 shift: 5", (1, 3))))
    x = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    y = net(data=x)["out"]
    assert torch.equal(y, torch.ones(1, 3))
    y.backward(torch.full_like(y, float("inf")))
    assert torch.equal(x.grad, torch.zeros(1, 3))


def test_scale_zero_negative_power_gives_inf_like_caffe():
    net = Net(parse_net(power_net("power: -1 scale: 0 shift: 0", (1, 2))))
    assert torch.all(torch.isinf(net(data=torch.randn(1, 2))["out"]))


def test_bf16_channels_last_and_compile():
    net = Net(parse_net(power_net("power: 2 scale: 0.5 shift: 1")))
    check_runtime_variants(net, torch.randn(2, 3, 4, 5))
