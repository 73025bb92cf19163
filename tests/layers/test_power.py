"""Power, Exp and Log against OpenCV 4, NumPy transcriptions of Caffe's forward and backward
(special cases included), float64 gradcheck, and Caffe's checks on the base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
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


# -- Exp and Log -------------------------------------------------------------------------------


def unary_net(layer: str, params: str, shape=(2, 3, 4, 5), pre: str = "") -> str:
    """Input -> [optional layer ``pre`` writing "pre"] -> ``layer`` called "out"."""
    dims = " ".join(f"dim: {d}" for d in shape)
    bottom = "pre" if pre else "data"
    pre_layer = f'layer {{ name: "pre" {pre} bottom: "data" top: "pre" }}\n' if pre else ""
    field = {"Exp": "exp_param", "Log": "log_param"}[layer]
    out = f'name: "out" type: "{layer}" bottom: "{bottom}" top: "out"'
    return f"""name: "{layer.lower()}_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
{pre_layer}layer {{ {out} {field} {{ {params} }} }}
"""


def base_params(base, scale, shift):
    return f"base: {base} scale: {scale} shift: {shift}"


def expf(x):
    """glibc's expf, which Caffe calls, is all but correctly rounded; NumPy's float32 exp is
    off by an ulp in a third of the cases, so the references round the double result."""
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def logf(x):
    return np.log(np.asarray(x, np.float64)).astype(np.float32)


def f32_log_base(base):
    return np.float32(1) if base == -1 else logf(base)


def caffe_exp(x, base, scale, shift):
    """Caffe's ExpLayer in float32: y = outer * exp(inner * x); returns y and the factor g of
    Caffe's backward dx = (y * dy) * g."""
    f = np.float32
    inner = f32_log_base(base) * f(scale)
    if shift == 0:
        outer = f(1)
    else:
        outer = expf(shift) if base == -1 else f(np.power(float(base), float(shift)))
    y = expf(x * inner if inner != 1 else x)
    y = y * outer if outer != 1 else y
    return y, inner


def caffe_log(x, base, scale, shift):
    """Caffe's LogLayer in float32: y and d(top)/d(bottom) (powx(t, -1) * scale / log(base))."""
    f = np.float32
    log_base = f32_log_base(base)
    base_scale, num_scale = f(1) / log_base, f(scale) / log_base
    t = x * f(scale) if scale != 1 else x
    t = t + f(shift) if shift != 0 else t
    y = logf(t)
    y = y * base_scale if base_scale != 1 else y
    grad = np.power(t, f(-1))
    return y, (grad * num_scale if num_scale != 1 else grad)


EXP_CASES = [  # (base, scale, shift): Caffe's test_neuron_layer cases and a few more
    (-1.0, 1.0, 0.0),
    (-1.0, 1.0, 1.0),
    (2.0, 1.0, 0.0),
    (2.0, 1.0, 1.0),
    (2.0, 3.0, 0.0),
    (2.0, 3.0, 1.0),
    (0.5, -2.0, 0.3),
    (10.0, 0.25, -1.5),
    (-1.0, -0.5, 2.0),
]
LOG_CASES = [
    (-1.0, 1.0, 0.0),
    (2.0, 1.0, 0.0),
    (2.0, 1.0, 1.0),
    (2.0, 3.0, 0.0),
    (2.0, 3.0, 1.0),
    (10.0, 0.5, 2.0),
    (0.5, 2.0, 1.0),
    (-1.0, -2.0, 10.0),
]


@pytest.mark.parametrize("base,scale,shift", EXP_CASES)
def test_exp_matches_opencv(base, scale, shift):
    # OpenCV folds the shift into the exponent (exp(scale*ln(base)*x + shift*ln(base))):
    # the same value up to rounding.
    compare_with_opencv(unary_net("Exp", base_params(base, scale, shift)), tol=2e-6)


def test_log_matches_opencv():
    # OpenCV's Log ignores log_param (base 2, scale 0.5, shift 3 gives ln(x) there), so only the
    # defaults are compared; AbsVal keeps the input in Log's domain.
    text = unary_net("Log", "", pre='type: "AbsVal"')
    compare_with_opencv(text, tol=1e-6)


def run_with_grad(text, x, dy):
    net = Net(parse_net(text))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy))
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("base,scale,shift", EXP_CASES)
def test_exp_forward_and_backward_match_caffe(base, scale, shift):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = run_with_grad(unary_net("Exp", base_params(base, scale, shift)), x, dy)
    ref_y, inner = caffe_exp(x, base, scale, shift)
    ref_dx = ref_y * dy * inner if inner != 1 else ref_y * dy
    # an ulp apart at most: torch's float exp and glibc's expf differ in ~1% of the inputs
    np.testing.assert_allclose(y, ref_y, rtol=2.4e-7, atol=0)
    np.testing.assert_allclose(dx, ref_dx, rtol=4e-7, atol=1e-37)


@pytest.mark.parametrize("base,scale,shift", LOG_CASES)
def test_log_forward_and_backward_match_caffe(base, scale, shift):
    rng = np.random.default_rng(7)
    x = rng.uniform(0.1, 3.0, (2, 3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = run_with_grad(unary_net("Log", base_params(base, scale, shift)), x, dy)
    ref_y, ref_grad = caffe_log(x, base, scale, shift)
    np.testing.assert_allclose(y, ref_y, rtol=2.4e-7, atol=6e-8)
    np.testing.assert_allclose(dx, dy * ref_grad, rtol=2.4e-7, atol=0)


def test_exp_folds_the_shift_out_as_caffe():
    # base e, shift 1: Caffe multiplies exp(x) by the float constant e; exp(x + 1) differs.
    net = Net(parse_net(unary_net("Exp", "shift: 1", (1, 4))))
    x = torch.tensor([[-3.0, 0.1, 0.7, 2.5]])
    assert torch.equal(net(data=x)["out"], torch.exp(x) * np.float32(np.e).item())
    # base 1: exp(0 * x) = 1 everywhere, and Caffe's (y * dy) * 0 gradient
    net = Net(parse_net(unary_net("Exp", "base: 1 scale: 4 shift: 2", (1, 4))))
    x.requires_grad_()
    y = net(data=x)["out"]
    y.sum().backward()
    assert torch.equal(y, torch.ones(1, 4)) and torch.equal(x.grad, torch.zeros(1, 4))


def test_log_at_zero_is_caffes():
    # shift + scale*x == 0: -inf forward, dy * (scale / log(base)) / 0 backward
    net = Net(parse_net(unary_net("Log", "base: 2 scale: 2 shift: -1", (1, 2))))
    x = torch.tensor([[0.5, 1.5]], requires_grad=True)
    y = net(data=x)["out"]
    y.backward(torch.tensor([[-1.0, 1.0]]))
    assert y[0, 0] == -math.inf and x.grad[0, 0] == -math.inf
    num_scale = np.float32(2) / np.log(np.float32(2))
    torch.testing.assert_close(x.grad[0, 1], torch.tensor(float(num_scale / np.float32(2))))


@pytest.mark.parametrize(
    "layer,base,scale,shift",
    [
        *[("Exp", *c) for c in EXP_CASES[1:7:2]],
        *[("Log", *c) for c in LOG_CASES[2:8:2]],
    ],
)
def test_exp_log_gradcheck(layer, base, scale, shift):
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64) + 0.5
    gradcheck_net(
        unary_net(layer, base_params(base, scale, shift), (2, 3, 2, 2)),
        inputs={"data": x},
        check_inputs=["data"],
    )


@pytest.mark.parametrize(
    "layer,params,message",
    [
        ("Exp", "base: 0", "exp_param.base must be strictly positive"),
        ("Exp", "base: -2", "exp_param.base must be strictly positive"),
        ("Exp", "base: nan", "exp_param.base must be strictly positive"),
        ("Exp", "base: inf", r"exp_param.base inf gives log\(base\) = inf"),
        ("Log", "base: -0.5", "log_param.base must be strictly positive"),
        ("Log", "base: inf", r"log_param.base inf gives log\(base\) = inf"),
        ("Log", "base: 1", r"log_param.base 1.0 gives 1/log\(base\) = inf"),
    ],
)
def test_caffe_refuses_bad_bases(layer, params, message):
    with pytest.raises(CaffeAlexError, match=f"layer 'out' \\({layer}\\): {message}"):
        Net(parse_net(unary_net(layer, params)))


def test_exp_base_one_and_log_base_below_one_build():
    # Caffe's checks let base 1 through for Exp (log(base) = 0 is finite) and any positive base
    # but 1 for Log.
    Net(parse_net(unary_net("Exp", "base: 1")))
    Net(parse_net(unary_net("Log", "base: 0.25")))


@pytest.mark.parametrize("layer,params", [("Exp", "base: 2 scale: 0.5 shift: 1"), ("Log", "")])
def test_exp_log_bf16_channels_last_and_compile(layer, params):
    pre = 'type: "AbsVal"' if layer == "Log" else ""
    net = Net(parse_net(unary_net(layer, params, pre=pre)))
    check_runtime_variants(net, torch.randn(2, 3, 4, 5).abs() + 0.5)
