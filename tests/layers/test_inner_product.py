"""InnerProduct against OpenCV 4 and a NumPy transcription of Caffe's GEMM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_alex.errors import CaffeAlexError
from caffe_alex.layers.inner_product import FUSED_PRODUCT_LIMIT
from caffe_alex.net import Net
from caffe_alex.tools.tracing import quiet_export, trace_net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net, randomize


def ip_net(params: str, shape=(2, 3, 4, 5)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "ip_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ {params} }} }}
"""


def caffe_inner_product(x, weight, bias, axis, transpose):
    """Caffe: M x K bottom (axes before ``axis`` are M) times W^T (W is N x K), or times W
    (K x N) with transpose; then the bias on every row."""
    axis = axis % x.ndim
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    top = flat @ (weight if transpose else weight.T)
    if bias is not None:
        top = top + bias
    return top.reshape(*x.shape[:axis], -1)


CASES = [
    ((2, 3, 4, 5), "num_output: 7"),
    ((2, 3, 4, 5), "num_output: 7 bias_term: false"),
    ((2, 3, 4, 5), "num_output: 6 axis: 2"),
    ((2, 3, 4, 5), "num_output: 6 axis: -1"),
    ((6, 10), "num_output: 4"),
    ((2, 3, 4, 5), "num_output: 7 transpose: true"),
    ((2, 3, 4, 5), "num_output: 3 axis: 2 transpose: true"),
    ((2, 3, 4, 5), "num_output: 3 axis: 0"),
]


@pytest.mark.parametrize("shape,params", CASES)
def test_matches_numpy(shape, params):
    text = ip_net(params, shape)
    ip = parse_net(text).layer[1].inner_product_param
    net = Net(parse_net(text), "TEST").double()
    randomize(net, seed=2)
    x = torch.randn(shape, dtype=torch.float64)
    out = net(data=x)["ip"].detach().numpy()
    blobs = [p.detach().numpy() for p in net.params["ip"]]
    want = caffe_inner_product(
        x.numpy(), blobs[0], blobs[1] if ip.bias_term else None, ip.axis, ip.transpose
    )
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


# OpenCV's importer reads axis but not transpose (its weights are always N x K), and with axis 0
# it keeps a trailing axis of 1 that Caffe does not have.
OPENCV_CASES = [c for c in CASES if "transpose" not in c[1] and "axis: 0" not in c[1]]


@pytest.mark.parametrize("shape,params", OPENCV_CASES)
def test_matches_opencv(shape, params):
    compare_with_opencv(ip_net(params, shape), tol=1e-5)


@pytest.mark.parametrize(
    "params,weight_shape",
    [
        ("num_output: 7", (7, 60)),
        ("num_output: 7 transpose: true", (60, 7)),
        ("num_output: 7 axis: 3", (7, 5)),
    ],
)
def test_blob_layout_and_fillers(params, weight_shape):
    params += (
        " weight_filler { type: 'gaussian' std: 0.01 } bias_filler { type: 'constant' value: 0.1 }"
    )
    net = Net(parse_net(ip_net(params)), "TEST")
    weight, bias = net.params["ip"]
    assert tuple(weight.shape) == weight_shape and tuple(bias.shape) == (7,)
    assert torch.all(bias == np.float32(0.1))
    assert 0.005 < weight.std().item() < 0.02


def test_reshape_keeps_k():
    net = Net(parse_net(ip_net("num_output: 4")), "TEST")
    assert net(data=torch.randn(5, 3, 4, 5))["ip"].shape == (5, 4)
    assert net(data=torch.randn(5, 60))["ip"].shape == (5, 4)  # same K, other axes
    with pytest.raises(CaffeAlexError, match=r"30 inputs.*set up for 60"):
        net(data=torch.randn(5, 3, 2, 5))


def test_config_errors():
    with pytest.raises(CaffeAlexError, match="num_output"):
        Net(parse_net(ip_net("bias_term: false")), "TEST")
    with pytest.raises(CaffeAlexError, match="axis 4 out of range"):
        Net(parse_net(ip_net("num_output: 3 axis: 4")), "TEST")


@pytest.mark.parametrize("params", ["num_output: 3", "num_output: 3 axis: 2 transpose: true"])
def test_gradcheck(params):
    gradcheck_net(ip_net(params, shape=(2, 2, 3)))


class _Recorded:
    """A torch.compile backend that keeps the traced graph's calls and runs it as it is."""

    def __init__(self):
        self.targets: list = []

    def __call__(self, gm, example_inputs):
        self.targets += [node.target for node in gm.graph.nodes
                         if node.op in ("call_function", "call_method")]  # fmt: skip
        return gm.forward


def _compiled_forward_and_grads(text: str, shape):
    net = Net(parse_net(text), "TEST")
    randomize(net, seed=3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    eager = net(data=x)["ip"]
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *net.params["ip"]])
    backend = _Recorded()
    compiled = torch.compile(lambda data: net(data=data)["ip"], backend=backend, dynamic=False)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *net.params["ip"]])
    return (eager, eager_grads), (out, grads), backend.targets


def _close_in_float32(got, want):
    """Equal up to float32 sums taken in another order: a few ulps of the largest term."""
    torch.testing.assert_close(got, want, rtol=0, atol=4e-6 * float(want.detach().abs().max()))


@pytest.mark.parametrize("shape,params", CASES)
def test_a_tiny_product_compiles_to_sums_of_products_with_the_same_numbers(shape, params):
    """Inside torch.compile a product of at most FUSED_PRODUCT_LIMIT multiply-adds is traced as
    a multiply and a sum (inductor fuses it with its neighbours instead of calling BLAS): the
    same top and gradients as the eager layer within float32 rounding, every layout."""
    (eager, eager_grads), (out, grads), targets = _compiled_forward_and_grads(
        ip_net(params, shape), shape)  # fmt: skip
    assert F.linear not in targets and "sum" in targets
    for got, want in zip((out, *grads), (eager, *eager_grads)):
        _close_in_float32(got, want)


def test_a_larger_product_stays_a_matrix_product_when_compiled():
    shape = (64, FUSED_PRODUCT_LIMIT // 64 // 8 + 1)  # 8 outputs: just over the limit
    (eager, _), (out, _), targets = _compiled_forward_and_grads(ip_net("num_output: 8", shape),
                                                                shape)  # fmt: skip
    assert F.linear in targets
    _close_in_float32(out, eager)
    shape = (64, FUSED_PRODUCT_LIMIT // 64 // 8)  # at the limit
    assert F.linear not in _compiled_forward_and_grads(ip_net("num_output: 8", shape), shape)[2]


def test_a_tiny_product_under_autocast_stays_the_autocast_product_when_compiled():
    """bf16 autocast (the ``precision`` option): the compiled layer computes what the eager
    one does, a bf16 matrix product, not a float32 sum."""
    shape = (2, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (eager, _), (out, _), targets = _compiled_forward_and_grads(
            ip_net("num_output: 7", shape), shape)  # fmt: skip
    assert F.linear in targets and out.dtype == eager.dtype == torch.bfloat16
    _close_in_float32(out.float(), eager.float())


def test_a_half_precision_net_keeps_its_matrix_product_when_compiled():
    """A net cast to bfloat16 by hand: each term of a bf16 sum of products would be rounded
    (a backend that does not widen them, unlike inductor, can overflow), so the product
    stays linear's."""
    net = Net(parse_net(ip_net("num_output: 3", (2, 4))), "TEST").to(torch.bfloat16)
    backend = _Recorded()
    compiled = torch.compile(lambda data: net(data=data)["ip"], backend=backend, dynamic=False)
    out = compiled(torch.randn(2, 4, dtype=torch.bfloat16))
    assert F.linear in backend.targets and out.dtype == torch.bfloat16


@pytest.mark.slow  # torch.export: a second or two
@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.export < 2.3")
def test_an_exported_tiny_product_keeps_its_matrix_product():
    """torch.export (ONNX's Gemm, the PyTorch source export) gets the product as a product."""
    net = Net(parse_net(ip_net("num_output: 3", (2, 4))), "TEST")
    with quiet_export():
        program = trace_net(net, (torch.randn(2, 4),), False, ["ip"])
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("linear" in t or "addmm" in t for t in targets), targets
    assert not any("aten.sum" in t for t in targets), targets
