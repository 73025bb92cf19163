"""ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Swish against OpenCV 4, NumPy transcriptions
of Caffe's forward and backward, float64 gradcheck, and the gradients at the kinks."""

from __future__ import annotations

import math
from types import SimpleNamespace

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
    relative_error,
)


def act_net(layer: str, shape=(2, 6, 5, 4), in_place=False) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    top = "data" if in_place else "out"
    return f"""name: "act_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" {layer} bottom: "data" top: "{top}" }}
"""


LAYERS = {
    "relu": 'type: "ReLU"',
    "leaky": 'type: "ReLU" relu_param { negative_slope: 0.1 }',
    "prelu": 'type: "PReLU"',
    "elu": 'type: "ELU"',
    "elu_half": 'type: "ELU" elu_param { alpha: 0.5 }',
    "sigmoid": 'type: "Sigmoid"',
    "tanh": 'type: "TanH"',
    "absval": 'type: "AbsVal"',
    "bnll": 'type: "BNLL"',
    "swish": 'type: "Swish"',  # OpenCV ignores swish_param.beta: beta != 1 is tested below
}


def caffe_forward(name: str, x: np.ndarray) -> np.ndarray:
    """Caffe's forward formulas (float32 except Sigmoid, whose double literals make it double)."""
    zero = np.float32(0)
    if name in ("relu", "leaky"):
        slope = np.float32(0.1 if name == "leaky" else 0)
        return np.maximum(x, zero) + slope * np.minimum(x, zero)
    if name.startswith("elu"):
        alpha = np.float32(0.5 if name == "elu_half" else 1)
        return np.maximum(x, zero) + alpha * (np.exp(np.minimum(x, zero)) - np.float32(1))
    if name == "sigmoid":
        return (0.5 * np.tanh(0.5 * x.astype(np.float64)) + 0.5).astype(np.float32)
    if name == "tanh":
        return np.tanh(x)
    if name == "bnll":
        return caffe_bnll(x, x)[0]
    if name == "swish":
        return caffe_swish(x, 1.0, x)[0]
    return np.abs(x)


def expf(x):
    """glibc's expf (Caffe's exp of a float) is all but correctly rounded; NumPy's float32 exp is
    an ulp off in a third of the cases, so round the double result."""
    with np.errstate(over="ignore"):  # np.where below evaluates both branches
        return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def caffe_bnll(x, dy):
    """BNLLLayer: x > 0 ? x + log(1. + exp(-x)) : log(1. + exp(x)), exp in float, the rest in
    double (the 1. literal); backward ev = exp(min(x, 50)), (dy*ev) in float / (ev + 1.)."""
    e = np.where(x > 0, expf(-x), expf(x)).astype(np.float64)
    y = np.where(x > 0, x.astype(np.float64) + np.log(1.0 + e), np.log(1.0 + e))
    ev = expf(np.minimum(x, np.float32(50)))
    dx = (dy * ev).astype(np.float64) / (ev.astype(np.float64) + 1.0)
    return y.astype(np.float32), dx.astype(np.float32)


def caffe_swish(x, beta, dy):
    """SwishLayer: s = Caffe's double sigmoid of beta*x (a float product), y = x*s; backward
    (CPU) dy * (beta*y + s*(1. - beta*y)) with beta*y in float, the rest in double."""
    t = x * np.float32(beta)
    s = (0.5 * np.tanh(0.5 * t.astype(np.float64)) + 0.5).astype(np.float32)
    y = x * s
    a = (np.float32(beta) * y).astype(np.float64)
    dx = dy.astype(np.float64) * (a + s.astype(np.float64) * (1.0 - a))
    return y, dx.astype(np.float32)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (3, 7)])
def test_matches_opencv(name, shape):
    errors = compare_with_opencv(act_net(LAYERS[name], shape), input_scale=3.0, tol=3e-7)
    assert errors


def test_prelu_channel_shared_matches_opencv():
    # OpenCV cannot read a zero-axis blob; hand it the shared slope as a 1-element blob.
    text = act_net('type: "PReLU" prelu_param { channel_shared: true }')
    net = Net(parse_net(text))
    with torch.no_grad():
        net.params["out"][0].fill_(0.37)
    shim = SimpleNamespace(
        name="", params={"out": [net.params["out"][0].reshape(1)]}, layer=net.layer
    )
    x = np.random.default_rng(0).standard_normal((2, 6, 5, 4)).astype(np.float32)
    theirs = opencv_forward(text, shim, {"data": x}, ["out"])["out"]
    ours = net(data=torch.from_numpy(x))["out"].detach().numpy()
    assert relative_error(ours, theirs) == 0.0


@pytest.mark.parametrize("name", [n for n in sorted(LAYERS) if n != "prelu"])
def test_matches_caffe_formula(name):
    x = (np.random.default_rng(1).standard_normal((4, 5, 6, 7)) * 6).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -40.0, 40.0]
    net = Net(parse_net(act_net(LAYERS[name], x.shape)))
    ours = net(data=torch.from_numpy(x))["out"].detach().numpy()
    expected = caffe_forward(name, x)
    # ulp-level agreement everywhere, not only relative to the largest value; exp and tanh
    # implementations differ by an ulp, which exp(x) - 1 turns into 1.2e-7 absolute.
    # Caffe's double sigmoid loses everything below ~1e-17 (it gives exactly 0 at x = -40).
    atol = 2e-7 if name in ("tanh", "elu", "elu_half") else 1e-16 if name == "sigmoid" else 0.0
    np.testing.assert_allclose(ours, expected, rtol=3e-7, atol=atol)


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5, 0.0, -1.5])
def test_swish_forward_and_backward_match_caffe(beta):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 5, 6)) * 6).astype(np.float32)
    x[0, 0, 0, :4] = [0.0, -40.0, 40.0, -100.0]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    net = Net(parse_net(act_net(f'type: "Swish" swish_param {{ beta: {beta} }}', x.shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy))
    ref_y, ref_dx = caffe_swish(x, beta, dy)
    # the same double sigmoid, but double tanh implementations differ by an ulp (2^-54 after
    # the cancellation, a large relative error where the sigmoid is below ~1e-9)
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1.2e-7, atol=1e-14)
    np.testing.assert_allclose(xt.grad.numpy(), ref_dx, rtol=2.4e-7, atol=1e-12)


def test_swish_quirks():
    # beta 0 is linear, x/2 with gradient 1/2; Caffe's double sigmoid cancels to exactly 0 for
    # beta*x below about -37 (torch.sigmoid would give 1e-17 there), and so does the gradient.
    net = Net(parse_net(act_net('type: "Swish" swish_param { beta: 0 }', (1, 3))))
    x = torch.tensor([[-3.0, 0.5, 7.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.sum().backward()
    assert torch.equal(y, x.detach() / 2) and torch.all(x.grad == 0.5)
    net = Net(parse_net(act_net('type: "Swish"', (1, 2))))
    x = torch.tensor([[-40.0, -80.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.sum().backward()
    assert torch.all(y == 0) and torch.all(x.grad == 0)


def test_bnll_forward_and_backward_match_caffe():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 4, 5, 6)) * 8).astype(np.float32)
    x.reshape(-1)[:9] = [0.0, -0.0, -40.0, -36.0, 40.0, 49.9, 50.0, 60.0, 1000.0]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    net = Net(parse_net(act_net('type: "BNLL"', x.shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy))
    ref_y, ref_dx = caffe_bnll(x, dy)
    # torch's float exp and glibc's expf disagree by an ulp on ~1% of the inputs
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1.2e-7, atol=1e-37)
    np.testing.assert_allclose(xt.grad.numpy(), ref_dx, rtol=2.4e-7, atol=1e-37)


def test_bnll_quirks():
    net = Net(parse_net(act_net('type: "BNLL"', (1, 4))))
    x = torch.tensor([[-40.0, 60.0, 1000.0, -1000.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.backward(torch.full_like(y, 0.75))
    # log(1. + e) in double, not log1p: 1 + 4e-18 rounds to 1, so y is exactly 0 at -40
    assert y[0, 0] == 0.0 and torch.equal(y[0, 1:3], x.detach()[0, 1:3])
    # the exp in the backward is clamped at x = 50, so huge x gives dy, not inf/inf = NaN;
    # the backward does not see the forward's rounding to 0 (dy*exp(-40)/(1 + exp(-40)))
    assert torch.equal(x.grad[0, 1:], torch.tensor([0.75, 0.75, 0.0]))
    torch.testing.assert_close(x.grad[0, 0], torch.tensor(0.75 * math.exp(-40)))


def test_prelu_blob_layout_and_filler():
    per_channel = Net(parse_net(act_net('type: "PReLU"', (2, 6, 3, 3))))
    assert tuple(per_channel.params["out"][0].shape) == (6,)
    assert torch.all(per_channel.params["out"][0] == 0.25)
    filler = 'filler { type: "constant" value: -2 }'
    shared = Net(
        parse_net(act_net(f'type: "PReLU" prelu_param {{ channel_shared: true {filler} }}'))
    )
    assert tuple(shared.params["out"][0].shape) == ()
    assert shared.params["out"][0].item() == -2.0
    x = torch.randn(2, 6, 5, 4)
    torch.testing.assert_close(shared(data=x)["out"], torch.where(x > 0, x, -2 * x))


def prelu_formula(x, slopes):
    s = slopes.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.maximum(x, 0) + s * np.minimum(x, 0)


def test_prelu_forward_and_slope_gradient_match_caffe():
    net = Net(parse_net(act_net('type: "PReLU"', (2, 3, 4))))
    slopes = np.array([0.5, -1.5, 2.0], dtype=np.float32)
    with torch.no_grad():
        net.params["out"][0].copy_(torch.from_numpy(slopes))
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    x[0, 0, 0] = 0.0
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    out = net(data=xt)["out"]
    out.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(out.detach().numpy(), prelu_formula(x, slopes), rtol=1e-7)
    slope_diff = (dy * x * (x <= 0)).sum(axis=(0, 2))  # Caffe: sum of dy*x over x <= 0
    np.testing.assert_allclose(net.params["out"][0].grad.numpy(), slope_diff, rtol=1e-6)
    dx = dy * np.where(x > 0, 1, slopes.reshape(1, 3, 1))  # slope at x == 0 as well
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-7)


def away_from_kinks(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 0.1
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    return x * sign


@pytest.mark.parametrize(
    "layer",
    [
        *LAYERS.values(),
        'type: "PReLU" prelu_param { channel_shared: true }',
        'type: "Swish" swish_param { beta: 1.7 }',
        'type: "Swish" swish_param { beta: -0.6 }',
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (3, 4)])
def test_gradcheck(layer, shape):
    gradcheck_net(
        act_net(layer, shape), inputs={"data": away_from_kinks(shape)}, check_inputs=["data"]
    )


KINKS = [  # (layer, gradient Caffe gives at x == 0)
    ('type: "ReLU"', 0.0),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', 0.1),
    ('type: "PReLU" prelu_param { filler { type: "constant" value: 0.3 } }', 0.3),
    ('type: "ELU" elu_param { alpha: 0.5 }', 0.5),
    ('type: "AbsVal"', 0.0),
]


@pytest.mark.parametrize("layer,expected", KINKS)
def test_gradient_at_zero(layer, expected):
    net = Net(parse_net(act_net(layer, (1, 2, 3))))
    x = torch.zeros(1, 2, 3, requires_grad=True)
    net(data=x)["out"].sum().backward()
    assert torch.all(x.grad == torch.tensor(expected))


def test_elu_backward_is_caffes():
    # Caffe's dy*(y + alpha) is 0 where y + alpha rounds to 0; torch's alpha*exp(x) is not.
    net = Net(parse_net(act_net('type: "ELU" elu_param { alpha: 2 }', (1, 4))))
    x = torch.tensor([[-30.0, -1.0, 0.5, 0.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.backward(torch.full_like(y, 3.0))
    expected = 3.0 * torch.where(x > 0, 1.0, y.detach() + 2.0)
    assert torch.equal(x.grad, expected)
    assert x.grad[0, 0] == 0.0


@pytest.mark.parametrize("layer", [v for k, v in LAYERS.items() if k != "absval"])
def test_in_place_keeps_gradient(layer):
    x = away_from_kinks((2, 6, 5, 4)).float().requires_grad_()
    plain = Net(parse_net(act_net(layer)))
    in_place = Net(parse_net(act_net(layer, in_place=True)))
    in_place.load_state_dict(plain.state_dict())
    x2 = x.detach().clone().requires_grad_()
    plain(data=x)["out"].sum().backward()
    in_place(data=x2)["data"].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_absval_rejects_in_place():
    with pytest.raises(CaffeAlexError, match="in-place"):
        Net(parse_net(act_net('type: "AbsVal"', in_place=True)))


def test_prelu_needs_two_axes():
    with pytest.raises(CaffeAlexError, match="at least 2 axes"):
        Net(parse_net(act_net('type: "PReLU"', (5,))))


@pytest.mark.parametrize("layer", [*LAYERS.values()])
def test_bf16_channels_last_and_compile(layer):
    x = torch.randn(2, 6, 5, 4) * 3
    net = Net(parse_net(act_net(layer)))
    ref = net(data=x)["out"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(net(data=x)["out"].float(), ref, rtol=2e-2, atol=2e-2)
    check_runtime_variants(net, x)
