"""Dropout: identity in TEST (against OpenCV), Caffe's inverted dropout in TRAIN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, parse_net


def dropout_net(ratio: float | None = 0.5, shape=(2, 3, 4, 5), in_place=False) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    param = "" if ratio is None else f"dropout_param {{ dropout_ratio: {ratio} }}"
    top = "data" if in_place else "out"
    return f"""name: "dropout_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" type: "Dropout" bottom: "data" top: "{top}" {param} }}
"""


def caffe_scale(ratio: float) -> np.float32:
    # the proto stores a float; Caffe divides in double and keeps a float
    return np.float32(1.0 / (1.0 - np.float64(np.float32(ratio))))


@pytest.mark.parametrize("ratio", [None, 0.3, 0.9])
def test_test_phase_is_identity_like_opencv(ratio):
    assert compare_with_opencv(dropout_net(ratio), tol=0.0)["out"] == 0.0


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.9, 0.1])
def test_train_mask_fraction_and_scale(ratio):
    net = Net(parse_net(dropout_net(ratio, (4, 8, 50, 50))), "TRAIN")
    x = torch.rand(4, 8, 50, 50) + 0.5  # never zero, so a zero output means dropped
    torch.manual_seed(0)
    y = net(data=x)["out"]
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - ratio)) < 0.01
    expected = (x.numpy() * caffe_scale(ratio))[kept.numpy()]
    assert np.array_equal(y[kept].numpy(), expected)


def test_train_backward_uses_the_same_mask():
    net = Net(parse_net(dropout_net(0.4, (3, 7, 6))), "TRAIN")
    x = (torch.rand(3, 7, 6) + 0.5).requires_grad_()
    dy = torch.randn(3, 7, 6)
    y = net(data=x)["out"]
    y.backward(dy)
    mask = (y != 0).float() * float(caffe_scale(0.4))
    assert torch.equal(x.grad, dy * mask)


def test_train_gradcheck_with_fixed_seed():
    net = Net(parse_net(dropout_net(0.3, (2, 3, 2, 2))), "TRAIN").double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def run(t):
        torch.manual_seed(7)
        return net(data=t)["out"]

    assert torch.autograd.gradcheck(run, (x,))


def test_deterministic_under_manual_seed():
    net = Net(parse_net(dropout_net(0.5, (2, 3, 8, 8))), "TRAIN")
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(123)
    a = net(data=x)["out"]
    torch.manual_seed(123)
    b = net(data=x)["out"]
    c = net(data=x)["out"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_identity_in_test_phase_eval_mode_and_ratio_zero():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(Net(parse_net(dropout_net(0.5)), "TEST")(data=x)["out"], x)
    train = Net(parse_net(dropout_net(0.5)), "TRAIN")
    train.eval()
    assert torch.equal(train(data=x)["out"], x)
    assert torch.equal(Net(parse_net(dropout_net(0.0)), "TRAIN")(data=x)["out"], x)


def test_in_place_train_keeps_input_intact():
    net = Net(parse_net(dropout_net(0.5, in_place=True)), "TRAIN")
    x = torch.rand(2, 3, 4, 5) + 0.5
    before = x.clone()
    y = net(data=x)["data"]
    assert torch.equal(x, before)
    assert (y == 0).any()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio_rejected(ratio):
    with pytest.raises(CaffeAlexError, match="dropout_ratio"):
        Net(parse_net(dropout_net(ratio)), "TRAIN")


def test_bf16_channels_last_and_compile():
    net = Net(parse_net(dropout_net(0.5, (2, 4, 6, 6))), "TRAIN")
    x = torch.rand(2, 4, 6, 6) + 0.5
    for value in (x.bfloat16(), x.to(memory_format=torch.channels_last)):
        y = net(data=value)["out"]
        assert y.dtype == value.dtype
        assert torch.all((y == 0) | (y == value * 2))
    torch._dynamo.reset()  # every Net shares Net.forward: stay under dynamo's recompile limit
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    y = compiled(data=xc)["out"]
    y.sum().backward()
    assert torch.all((y == 0) | (y == x * 2))
    assert torch.equal(xc.grad, (y != 0).float() * 2)


# -- caffe-fast-rcnn's scale_train (OpenCV ignores it: NumPy transcriptions of the fork) ------


def unscaled_net(ratio: float, shape=(3, 4, 5)) -> str:
    return dropout_net(ratio, shape).replace(
        f"dropout_ratio: {ratio} }}", f"dropout_ratio: {ratio} scale_train: false }}"
    )


def fork_test_factor(ratio: float) -> np.float32:
    # dropout_layer.cpp: caffe_scal(count, 1. / scale_, top) with scale_ a float
    return np.float32(1.0 / np.float64(caffe_scale(ratio)))


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_scale_train_false_test_phase_multiplies_by_one_minus_ratio(ratio):
    net = Net(parse_net(unscaled_net(ratio)), "TEST")
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = net(data=x)["out"]
    assert np.array_equal(y.detach().numpy(), x.detach().numpy() * fork_test_factor(ratio))
    dy = torch.randn(3, 4, 5)
    y.backward(dy)
    assert np.array_equal(x.grad.numpy(), dy.numpy() * fork_test_factor(ratio))


def test_scale_train_false_train_phase_keeps_values_unscaled():
    net = Net(parse_net(unscaled_net(0.5, (4, 8, 40))), "TRAIN")
    x = (torch.rand(4, 8, 40) + 0.5).requires_grad_()
    torch.manual_seed(1)
    y = net(data=x)["out"]
    kept = (y != 0).numpy()
    assert abs(kept.mean() - 0.5) < 0.03
    assert np.array_equal(y.detach().numpy(), np.where(kept, x.detach().numpy(), 0))
    dy = torch.randn(4, 8, 40)
    y.backward(dy)
    assert np.array_equal(x.grad.numpy(), np.where(kept, dy.numpy(), 0))


def test_scale_train_true_is_bvlcs_dropout():
    text = dropout_net(0.5).replace(
        "dropout_ratio: 0.5 }", "dropout_ratio: 0.5 scale_train: true }"
    )
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(Net(parse_net(text), "TEST")(data=x)["out"], x)


def test_segnet_sample_weights_test_drops_in_test_phase_too():
    # caffe-segnet's Bayesian SegNet: sample_weights_test keeps dropping in TEST (and in eval()),
    # with the same mask in backward.
    text = dropout_net(None, (4, 8, 20, 20)).replace(
        'type: "Dropout" bottom: "data" top: "out"',
        'type: "Dropout" bottom: "data" top: "out" '
        "dropout_param { dropout_ratio: 0.3 sample_weights_test: true }",
    )
    net = Net(parse_net(text), "TEST").eval()
    x = (torch.rand(4, 8, 20, 20) + 0.5).requires_grad_()
    torch.manual_seed(0)
    y = net(data=x)["out"]
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], x[kept] * caffe_scale(0.3))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * caffe_scale(0.3))
