"""Reduction against a NumPy transcription of Caffe's reduction_layer.cpp (forward and backward
loops in float32) and float64 gradcheck. OpenCV 4's Caffe importer has no "Reduction" ("Can't
create layer ... of type Reduction"), so there is no OpenCV comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import check_runtime_variants, gradcheck_net, parse_net


def reduction_net(params: str = "", shape=(2, 3, 4, 5)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "reduction_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" type: "Reduction" bottom: "data" top: "out"
  reduction_param {{ {params} }} }}
"""


def caffe_reduction(x, dy, op, axis, coeff):
    """ReductionLayer::Forward_cpu / Backward_cpu in float32, row by row."""
    f32 = np.float32
    axis = axis % x.ndim
    num, dim = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
    rows = x.astype(f32).reshape(num, dim)
    coeff = f32(coeff) / f32(dim) if op == "MEAN" else f32(coeff)
    if op in ("SUM", "MEAN"):
        top = rows.sum(axis=1, dtype=f32)
    elif op == "ASUM":
        top = np.abs(rows).sum(axis=1, dtype=f32)
    else:
        top = (rows * rows).sum(axis=1, dtype=f32)
    if coeff != 1:
        top = top * coeff
    bottom_coeff = dy.astype(f32).reshape(num, 1) * coeff
    if op in ("SUM", "MEAN"):
        grad = np.broadcast_to(bottom_coeff, rows.shape)
    elif op == "ASUM":
        grad = ((rows > 0).astype(f32) - (rows < 0).astype(f32)) * bottom_coeff
    else:
        grad = (2 * bottom_coeff) * rows
    return top.reshape(x.shape[:axis]), grad.reshape(x.shape)


def run(params, x, dy):
    net = Net(parse_net(reduction_net(params, x.shape)))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy).reshape(y.shape))
    return net, y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("coeff", [1.0, 2.5, -0.3])
def test_forward_and_backward_match_caffe(op, axis, coeff):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0, :2] = 0.0  # ASUM's sign(0) = 0
    top_shape = x.shape[: axis % 4]
    dy = rng.standard_normal(top_shape).astype(np.float32)
    params = f"operation: {op} axis: {axis} coeff: {coeff}"
    net, y, grad = run(params, x, dy)
    want_y, want_grad = caffe_reduction(x, dy, op, axis, coeff)
    assert y.shape == top_shape == net.blob_shapes["out"]
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_defaults_sum_everything_into_a_scalar():
    net = Net(parse_net(reduction_net("", (3, 4))))
    assert net.blob_shapes["out"] == ()
    x = torch.arange(12.0).reshape(3, 4)
    y = net(data=x)["out"]
    assert y.shape == () and y.item() == 66.0


def test_mean_divides_coeff_by_the_reduced_count_in_float():
    # coeff / dim is taken in float32 before the multiply, as Caffe's Dtype coeff_ /= dim_.
    net = Net(parse_net(reduction_net("operation: MEAN axis: 1 coeff: 0.7", (2, 3, 7))))
    x = torch.ones(2, 3, 7)
    want = np.float32(21) * (np.float32(0.7) / np.float32(21))
    assert net(data=x)["out"].tolist() == [float(want)] * 2


def test_asum_gradient_at_zero_and_nan_is_caffe_sign():
    net = Net(parse_net(reduction_net("operation: ASUM coeff: 2", (4,))))
    x = torch.tensor([0.0, -0.0, 3.0, float("nan")], requires_grad=True)
    net(data=x)["out"].backward()
    assert x.grad.tolist() == [0.0, 0.0, 2.0, 0.0]  # Caffe's sign is 0 for 0 and for NaN


@pytest.mark.parametrize("axis,shape", [(4, (2, 3, 4, 5)), (-5, (2, 3, 4, 5)), (0, ())])
def test_axis_out_of_range_is_refused(axis, shape):
    with pytest.raises(CaffeAlexError, match=r"layer 'out' \(Reduction\).*reduction_param.axis"):
        Net(parse_net(reduction_net(f"axis: {axis}", shape)))


@pytest.mark.parametrize(
    "params",
    [
        "",
        "operation: ASUM axis: 1 coeff: -2",
        "operation: SUMSQ axis: 2",
        "operation: MEAN axis: -1",
    ],
)
def test_gradcheck(params):
    x = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gradcheck_net(
        reduction_net(params, (2, 3, 2, 2)), inputs={"data": x + 0.1}, check_inputs=["data"]
    )


def test_float64_reshape_and_runtime_variants():
    net = Net(parse_net(reduction_net("operation: SUMSQ axis: 1 coeff: 0.5")))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    assert net(data=torch.randn(6, 3, 2, 2))["out"].shape == (6,)
    assert net.double()(data=x.double())["out"].dtype == torch.float64
    net.float()
    check_runtime_variants(net, x)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_cuda_matches_cpu(op):
    net = Net(parse_net(reduction_net(f"operation: {op} axis: 1 coeff: 1.5")))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5))
    results = []
    for device in ("cpu", "cuda"):
        net.to(device)
        xt = x.to(device).requires_grad_()
        y = net(data=xt)["out"]
        (y * torch.tensor([1.0, -2.0], device=device)).sum().backward()
        results.append((y.detach().cpu(), xt.grad.cpu()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
