"""Clip and Threshold against literal transcriptions of Caffe's CPU loops, the gradient rule at
Clip's bounds, float64 gradcheck, Caffe's required clip_param fields, and Threshold's missing
backward. OpenCV 4 (4.14) has neither type ("Can't create layer ... of type Clip/Threshold"
when importing the net), so there is no OpenCV comparison here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import check_runtime_variants, gradcheck_net, parse_net


def one_layer_net(layer: str, shape=(2, 3, 4, 5), extra: str = "") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "clip_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" {layer} bottom: "data" top: "out" {extra} }}
"""


def clip(low, high) -> str:
    return f'type: "Clip" clip_param {{ min: {low} max: {high} }}'


def caffe_clip(x: np.ndarray, low: float, high: float, dy: np.ndarray):
    """ClipLayer's CPU loops: std::max(min, std::min(x, max)) (Python's min/max pick the same
    operand as std::min/std::max, NaN included) and dy * (x >= min && x <= max)."""
    low, high = np.float32(low), np.float32(high)
    y = np.array([max(low, min(v, high)) for v in x.ravel()], np.float32).reshape(x.shape)
    return y, dy * ((x >= low) & (x <= high))


def run_with_grad(text: str, x: np.ndarray, dy: np.ndarray):
    net = Net(parse_net(text))
    xt = torch.from_numpy(x).requires_grad_()
    y = net(data=xt)["out"]
    y.backward(torch.from_numpy(dy))
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("low,high", [(-0.5, 0.7), (0, 6), (-1e30, 0.25), (1.5, 1.5), (2, -2)])
def test_clip_matches_caffe(low, high):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 5)) * 2).astype(np.float32)
    x.reshape(-1)[:6] = [low, high, np.nan, np.inf, -np.inf, -0.0]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx = run_with_grad(one_layer_net(clip(low, high)), x, dy)
    ref_y, ref_dx = caffe_clip(x, low, high, dy)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(dx, ref_dx)


def test_clip_gradient_passes_at_the_bounds():
    # Caffe's mask is min <= x <= max: the gradient passes at x == min and at x == max
    # (autograd of min/max compositions would stop it at one of them)
    net = Net(parse_net(one_layer_net(clip(-1, 2), (1, 6))))
    x = torch.tensor([[-1.0, 2.0, -1.0000001, 2.0000002, 0.5, math.nan]], requires_grad=True)
    y = net(data=x)["out"]
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, torch.tensor([[3.0, 3.0, 0.0, 0.0, 3.0, 0.0]]))
    assert torch.equal(y, torch.tensor([[-1.0, 2.0, -1.0, 2.0, 0.5, -1.0]]))


def test_clip_quirks_of_caffes_cpu_loop():
    # NaN becomes min (std::max(min, NaN) keeps min; torch.clamp keeps NaN) and min > max gives
    # min everywhere with no gradient (torch.clamp gives max)
    net = Net(parse_net(one_layer_net(clip(3, -3), (1, 4))))
    x = torch.tensor([[math.nan, -5.0, 0.0, 5.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.sum().backward()
    assert torch.equal(y, torch.full((1, 4), 3.0)) and torch.equal(x.grad, torch.zeros(1, 4))


def test_clip_without_clip_param_clips_to_zero():
    # Caffe reads the proto defaults of an absent clip_param: min = max = 0, gradient at x == 0
    net = Net(parse_net(one_layer_net('type: "Clip"', (1, 3))))
    x = torch.tensor([[-2.0, 0.0, 2.0]], requires_grad=True)
    y = net(data=x)["out"]
    y.sum().backward()
    assert torch.equal(y, torch.zeros(1, 3)) and torch.equal(x.grad, torch.tensor([[0, 1.0, 0]]))


@pytest.mark.parametrize("params,missing", [("min: -1", "max"), ("max: 1", "min"), ("", "min")])
def test_clip_param_fields_are_required(params, missing):
    # Caffe's protobuf parser refuses a clip_param without both of its required fields
    text = one_layer_net(f'type: "Clip" clip_param {{ {params} }}')
    with pytest.raises(CaffeAlexError, match=f"layer 'out' \\(Clip\\): clip_param.{missing} is"):
        Net(parse_net(text))


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (3, 4)])
def test_clip_gradcheck(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2
    x = torch.where((x - 0.5).abs() < 0.01, x + 0.1, x)  # keep away from the bounds
    x = torch.where((x + 0.7).abs() < 0.01, x + 0.1, x)
    gradcheck_net(one_layer_net(clip(-0.7, 0.5), shape), inputs={"data": x}, check_inputs=["data"])


def test_clip_float64_bf16_channels_last_and_compile():
    net = Net(parse_net(one_layer_net(clip(-0.5, 0.7))))
    x = torch.randn(2, 3, 4, 5)
    check_runtime_variants(net, x)
    y64 = net.double()(data=x.double())["out"]
    # the bounds are proto floats, also for a double net: 0.7 is 0.699999988
    high = float(np.float32(0.7))
    assert y64.dtype == torch.float64 and torch.equal(y64, x.double().clamp(-0.5, high))


# -- Threshold --------------------------------------------------------------------------------


def threshold(value=None) -> str:
    param = "" if value is None else f"threshold_param {{ threshold: {value} }}"
    return f'type: "Threshold" {param}'


@pytest.mark.parametrize("value", [None, 0.3, -1.25])
def test_threshold_matches_caffe(value):
    t = np.float32(0 if value is None else value)
    x = (np.random.default_rng(2).standard_normal((2, 3, 4, 5)) * 2).astype(np.float32)
    x.reshape(-1)[:5] = [t, np.nextafter(t, np.float32(9)), np.nan, -0.0, np.inf]
    net = Net(parse_net(one_layer_net(threshold(value))))
    y = net(data=torch.from_numpy(x))["out"].numpy()
    # Caffe: x > threshold ? 1 : 0 (strictly greater; NaN gives 0)
    expected = np.array([1.0 if v > t else 0.0 for v in x.ravel()], np.float32)
    np.testing.assert_array_equal(y, expected.reshape(x.shape))
    assert y.reshape(-1)[0] == 0.0 and y.reshape(-1)[1] == 1.0


IP_THRESHOLD = """name: "thr_test"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "thr" type: "Threshold" bottom: "ip" top: "thr" PROPAGATE }
"""


def ip_threshold_net(propagate_down: str = "") -> str:
    return IP_THRESHOLD.replace("PROPAGATE", propagate_down)


def test_threshold_backward_raises_like_caffes_not_implemented():
    # the bottom needs a gradient (InnerProduct has weights) and the top reaches the loss:
    # Caffe aborts in Threshold's backward; here the backward raises, naming the layer
    net = Net(parse_net(ip_threshold_net()))
    thr = net(data=torch.randn(2, 3))["thr"]
    assert thr.requires_grad  # forward runs, with the gradient graph built
    with pytest.raises(CaffeAlexError, match="layer 'thr' \\(Threshold\\): .*no backward"):
        thr.sum().backward()
    # also from an input that wants a gradient
    net = Net(parse_net(one_layer_net(threshold(0.5))))
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with pytest.raises(CaffeAlexError, match="layer 'out' \\(Threshold\\)"):
        net(data=x)["out"].sum().backward()


def test_threshold_without_a_gradient_through_it_is_fine():
    # Caffe runs no backward for it when nothing below needs one, when propagate_down is false,
    # or when its top does not reach the loss: here neither does autograd
    net = Net(parse_net(ip_threshold_net("propagate_down: false")))
    thr = net(data=torch.randn(2, 3))["thr"]
    (thr.sum() + net.blobs["ip"].sum()).backward()
    assert net.params["ip"][0].grad is not None
    net = Net(parse_net(ip_threshold_net()))
    net(data=torch.randn(2, 3))
    net.blobs["ip"].sum().backward()
    with torch.no_grad():
        net(data=torch.randn(2, 3))
    x = torch.randn(2, 3, 4, 5)
    y = Net(parse_net(one_layer_net(threshold(0.5))))(data=x)["out"]
    assert not y.requires_grad and torch.equal(y, (x > 0.5).float())


def test_threshold_float64_bf16_channels_last_and_compile():
    net = Net(parse_net(one_layer_net(threshold(0.25))))
    x = torch.randn(2, 3, 4, 5)
    ref = (x > 0.25).float()
    assert torch.equal(net(data=x.to(memory_format=torch.channels_last))["out"], ref)
    assert torch.equal(net(data=x.double())["out"], ref.double())
    low = net(data=x.bfloat16())["out"]
    assert low.dtype == torch.bfloat16 and torch.equal(low, (x.bfloat16() > 0.25).bfloat16())
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    # compiled, the gradient stops at the layer instead of raising (a graph cannot raise)
    assert torch.equal(compiled(data=x.requires_grad_())["out"], ref)
