"""LSTMUnit against NumPy transcriptions of Caffe's CPU forward and backward
(lstm_unit_layer.cpp), and float64 gradcheck where Caffe's backward is the true derivative.

OpenCV 4's Caffe importer has no LSTMUnit layer, so there is no second reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import gradcheck_net, parse_net

N, D = 4, 3


def unit_net(c_shape=(1, N, D), x_shape=(1, N, 4 * D), cont_shape=(1, N)) -> str:
    def dims(shape):
        return " ".join(f"dim: {d}" for d in shape)

    return f"""name: "unit"
layer {{ name: "in" type: "Input" top: "c_prev" top: "x" top: "cont"
  input_param {{ shape {{ {dims(c_shape)} }} shape {{ {dims(x_shape)} }}
    shape {{ {dims(cont_shape)} }} }} }}
layer {{ name: "unit" type: "LSTMUnit" bottom: "c_prev" bottom: "x" bottom: "cont"
  top: "c" top: "h" }}
"""


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def caffe_gates(x, cont):
    i, f, o, g = np.split(x[0], 4, axis=1)
    cont = cont[0][:, None]
    f = np.where(cont == 0, 0.0, cont * sigmoid(f))
    return sigmoid(i), f, sigmoid(o), np.tanh(g)


def caffe_forward(c_prev, x, cont):
    i, f, o, g = caffe_gates(x, cont)
    c = f * c_prev[0] + i * g
    return c[None], (o * np.tanh(c))[None]


def caffe_backward(c_prev, x, cont, c, dc, dh):
    """LSTMUnitLayer::Backward_cpu: f is the cont-scaled forget gate, also in f * (1 - f)."""
    i, f, o, g = caffe_gates(x, cont)
    tanh_c = np.tanh(c[0])
    c_term = dc[0] + dh[0] * o * (1 - tanh_c**2)
    dx = np.concatenate(
        [
            c_term * g * i * (1 - i),
            c_term * c_prev[0] * f * (1 - f),
            dh[0] * tanh_c * o * (1 - o),
            c_term * i * (1 - g * g),
        ],
        axis=1,
    )
    return (c_term * f)[None], dx[None]


def run(cont, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    net = Net(parse_net(unit_net()), "TEST")
    c_prev = torch.randn(1, N, D, generator=gen, dtype=dtype).requires_grad_()
    x = (torch.randn(1, N, 4 * D, generator=gen, dtype=dtype) * 2).requires_grad_()
    cont = torch.tensor([cont], dtype=dtype)
    out = net(c_prev=c_prev, x=x, cont=cont)
    return net, c_prev, x, cont, out


# Markers 0 and 1 as Caffe uses them, and other values, where Caffe's CPU backward is its own.
CONTS = [[0, 0, 0, 0], [1, 0, 1, 1], [0.5, 2.0, 0, 1], [-1.0, 0.25, 1, 3]]


@pytest.mark.parametrize("cont", CONTS)
def test_forward_matches_caffe(cont):
    _, c_prev, x, cont_t, out = run(cont)
    c, h = caffe_forward(c_prev.detach().numpy(), x.detach().numpy(), cont_t.numpy())
    np.testing.assert_allclose(out["c"].detach().numpy(), c, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out["h"].detach().numpy(), h, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cont", CONTS)
def test_backward_is_caffes_cpu_rule(cont):
    _, c_prev, x, cont_t, out = run(cont, seed=1)
    gen = torch.Generator().manual_seed(2)
    dc, dh = (torch.randn(1, N, D, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.autograd.backward([out["c"], out["h"]], [dc, dh])
    want_c, want_x = caffe_backward(
        *(t.detach().numpy() for t in (c_prev, x, cont_t, out["c"], dc, dh))
    )
    np.testing.assert_allclose(c_prev.grad.numpy(), want_c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(x.grad.numpy(), want_x, rtol=1e-12, atol=1e-15)


def test_non_binary_marker_departs_from_the_true_derivative():
    """With cont = 0.5 Caffe's forget-gate gradient is f(1 - f) with f = cont * s already
    scaled, not cont * s(1 - s) (s = sigmoid): Caffe's CPU number is kept (its GPU kernel
    computes the true derivative; both agree for markers 0 and 1)."""
    _, c_prev, x, _, out = run([0.5] * N, seed=3)
    out["c"].sum().backward()
    s = torch.sigmoid(x.detach()[..., D : 2 * D])
    f = 0.5 * s
    torch.testing.assert_close(x.grad[..., D : 2 * D], c_prev.detach() * f * (1 - f))
    assert not torch.allclose(x.grad[..., D : 2 * D], c_prev.detach() * 0.5 * s * (1 - s))


@pytest.mark.parametrize("cont", [[0, 0, 0, 0], [1, 0, 1, 1]])
def test_gradcheck(cont):
    """Caffe's own gradient tests: all markers 0, then mixed 0 and 1."""
    inputs = {"cont": torch.tensor([cont], dtype=torch.float64)}
    gradcheck_net(unit_net(), outputs=["c", "h"], inputs=inputs, check_inputs=["c_prev", "x"])


def test_no_gradient_to_cont():
    net = Net(parse_net(unit_net()), "TEST")
    cont = torch.ones(1, N, requires_grad=True)
    x = torch.randn(1, N, 4 * D, requires_grad=True)
    out = net(c_prev=torch.randn(1, N, D), x=x, cont=cont)
    (out["c"].sum() + out["h"].sum()).backward()
    assert cont.grad is None and x.grad is not None


def test_shapes():
    net = Net(parse_net(unit_net()), "TEST")
    assert net.blob_shapes["c"] == net.blob_shapes["h"] == (1, N, D)
    assert list(net.params) == []
    net.reshape(c_prev=(1, 2, 5), x=(1, 2, 20), cont=(1, 2))
    assert net.blob_shapes["h"] == (1, 2, 5)


@pytest.mark.parametrize(
    "shapes,message",
    [
        ({"c_shape": (N, D)}, r"bottom 0 \(c_prev\) must be 1 x N x D"),
        ({"c_shape": (2, N, D)}, r"bottom 0 \(c_prev\) must be 1 x N x D"),
        ({"x_shape": (1, N, 4 * D + 1)}, r"4 \* 3 = 12 values per stream"),
        ({"x_shape": (1, N + 1, 4 * D)}, r"bottom 1 \(gate input\) must be 1 x N x 4D with N = 4"),
        ({"cont_shape": (1, N, 1)}, r"bottom 2 \(cont\) must be 1 x N with N = 4"),
        ({"cont_shape": (2, N)}, r"bottom 2 \(cont\) must be 1 x N"),
    ],
)
def test_setup_errors(shapes, message):
    with pytest.raises(CaffeAlexError, match=r"layer 'unit' \(LSTMUnit\).*" + message):
        Net(parse_net(unit_net(**shapes)), "TEST")


def test_float32():
    _, c_prev, x, cont_t, out = run([1, 0, 1, 0.5], dtype=torch.float32)
    c, h = caffe_forward(*(t.detach().double().numpy() for t in (c_prev, x, cont_t)))
    np.testing.assert_allclose(out["h"].detach().numpy(), h, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["c"].detach().numpy(), c, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    _, c_prev, x, cont, out = run([1, 0, 1, 0.5])
    (out["c"].sum() + out["h"].sum()).backward()
    net = Net(parse_net(unit_net()), "TEST").cuda()
    cg, xg = (t.detach().cuda().requires_grad_() for t in (c_prev, x))
    gpu = net(c_prev=cg, x=xg, cont=cont.cuda())
    (gpu["c"].sum() + gpu["h"].sum()).backward()
    torch.testing.assert_close(gpu["h"].cpu(), out["h"])
    torch.testing.assert_close(xg.grad.cpu(), x.grad)
    torch.testing.assert_close(cg.grad.cpu(), c_prev.grad)
