"""HingeLoss and ContrastiveLoss against NumPy transcriptions of Caffe's hinge_loss_layer.cpp and
contrastive_loss_layer.cpp (forward and backward loops in float32), and float64 gradcheck.
OpenCV 4's Caffe importer has neither ("Can't create layer ... of type HingeLoss"), so there is
no OpenCV comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import gradcheck_net, loss_net, parse_net

f32 = np.float32


def caffe_hinge(x, label, norm, loss_weight=1.0):
    """HingeLossLayer: bottom_diff holds max(0, 1 + x * (-1 at the label)) between forward and
    backward; label n is value n of the label blob in memory order."""
    num = x.shape[0]
    diff = x.astype(f32).reshape(num, -1).copy()
    labels = [int(v) for v in label.reshape(-1)[:num]]  # int() truncates like static_cast<int>
    for i, k in enumerate(labels):
        diff[i, k] *= -1
    diff = np.maximum(f32(0), 1 + diff)
    loss = np.abs(diff).sum(dtype=f32) / num if norm == "L1" else (diff * diff).sum() / num
    for i, k in enumerate(labels):
        diff[i, k] *= -1
    if norm == "L1":
        grad = np.sign(diff) * f32(f32(loss_weight) / num)
    else:
        grad = diff * f32(f32(loss_weight) * 2 / num)
    return loss, grad.reshape(x.shape)


def run_hinge(params, x, label, extra=""):
    text = loss_net("HingeLoss", x.shape, label.shape, params=params, extra=extra)
    net = Net(parse_net(text))
    s, l = torch.tensor(x, requires_grad=True), torch.tensor(label, requires_grad=True)
    out = net(s=s, l=l)
    net.loss.backward()
    assert l.grad is None  # labels get no gradient
    return out["loss"], s.grad.numpy()


HINGE_CASES = [  # (scores shape, label shape, hinge_loss_param, loss_weight)
    ((5, 4), (5,), "", 1.0),
    ((5, 4), (5,), "hinge_loss_param { norm: L2 }", 1.0),
    ((3, 2, 2, 2), (3, 1, 1, 1), "hinge_loss_param { norm: L1 }", 2.0),
    ((3, 2, 3), (3,), "hinge_loss_param { norm: L2 }", 0.5),
    ((4, 3), (4, 2), "", 1.0),  # label n is flat value n: (0,0), (0,1), (1,0), (1,1)
]


@pytest.mark.parametrize("s_shape,l_shape,params,weight", HINGE_CASES)
def test_hinge_matches_caffe(s_shape, l_shape, params, weight):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(s_shape) * 1.5).astype(np.float32)
    dim = int(np.prod(s_shape[1:]))
    label = (rng.integers(0, dim, size=l_shape) + 0.6).astype(np.float32)  # truncated
    loss, grad = run_hinge(params, x, label, extra=f"loss_weight: {weight}")
    norm = "L2" if "L2" in params else "L1"
    want, want_grad = caffe_hinge(x, label, norm, weight)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradient_at_the_hinge_is_zero(norm):
    # 1 - x at the label and 1 + x elsewhere are exactly 0: Caffe's sign(0) (L1) and 0 * 2 (L2)
    x = np.array([[1.0, -1.0, 0.5], [-1.0, 2.0, -1.0]], np.float32)
    label = np.array([0.0, 1.0], np.float32)
    loss, grad = run_hinge(f"hinge_loss_param {{ norm: {norm} }}", x, label)
    want, want_grad = caffe_hinge(x, label, norm)
    np.testing.assert_allclose(loss.item(), want)
    assert grad.tolist() == want_grad.tolist()
    assert grad[0].tolist() == [0.0, 0.0, (0.5 if norm == "L1" else 1.5)]
    assert grad[1].tolist() == [0.0, 0.0, 0.0]


def test_hinge_errors():
    with pytest.raises(CaffeAlexError, match=r"layer 'loss' \(HingeLoss\).*same first dimension"):
        Net(parse_net(loss_net("HingeLoss", (3, 4), (2,))))
    with pytest.raises(CaffeAlexError, match="at most 4 axes"):
        Net(parse_net(loss_net("HingeLoss", (2, 2, 2, 2, 2), (2,))))
    with pytest.raises(CaffeAlexError, match="loss_param.ignore_label is not supported"):
        Net(parse_net(loss_net("HingeLoss", (3, 4), (3,), params="loss_param { ignore_label: 0 }")))
    net = Net(parse_net(loss_net("HingeLoss", (2, 3), (2,))))
    with pytest.raises(CaffeAlexError, match=r"layer 'loss' \(HingeLoss\): label 3 out of range"):
        net(s=torch.zeros(2, 3), l=torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradcheck(norm):
    text = loss_net("HingeLoss", (3, 4), (3,), params=f"hinge_loss_param {{ norm: {norm} }}")
    label = torch.tensor([0.0, 3.0, 1.0])
    gradcheck_net(text, outputs=["loss"], inputs={"l": label}, check_inputs=["s"])


def contrastive_net(params="", a=(4, 3), b=(4, 3), label=(4,), extra="") -> str:
    def dims(shape):
        return " ".join(f"dim: {d}" for d in shape)

    return f"""name: "contrastive_test"
layer {{ name: "in" type: "Input" top: "a" top: "b" top: "y"
  input_param {{ shape {{ {dims(a)} }} shape {{ {dims(b)} }} shape {{ {dims(label)} }} }} }}
layer {{ name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss"
  {extra} contrastive_loss_param {{ {params} }} }}
"""


def caffe_contrastive(a, b, y, margin=1.0, legacy=False, loss_weight=1.0):
    """ContrastiveLossLayer::Forward_cpu / Backward_cpu as loops in float32."""
    num = a.shape[0]
    diff = a.astype(f32).reshape(num, -1) - b.astype(f32).reshape(num, -1)
    dist_sq = (diff * diff).sum(axis=1, dtype=f32)
    margin, loss = f32(margin), f32(0)
    for i in range(num):
        if int(y.reshape(-1)[i]):
            loss += dist_sq[i]
        elif legacy:
            loss += max(margin - dist_sq[i], f32(0))
        else:
            d = max(margin - np.sqrt(dist_sq[i]), f32(0))
            loss += d * d
    loss = loss / f32(num) / f32(2)
    grads = []
    for sign, shape in ((1, a.shape), (-1, b.shape)):
        alpha = f32(sign * f32(loss_weight) / f32(num))
        grad = np.zeros_like(diff)
        for j in range(num):
            if int(y.reshape(-1)[j]):
                grad[j] = alpha * diff[j]
                continue
            if legacy:
                mdist, beta = margin - dist_sq[j], -alpha
            else:
                dist = np.sqrt(dist_sq[j])
                mdist = margin - dist
                beta = -alpha * mdist / (dist + f32(1e-4))
            grad[j] = beta * diff[j] if mdist > 0 else 0
        grads.append(grad.reshape(shape))
    return loss, grads[0], grads[1]


def run_contrastive(params, a, b, y, extra=""):
    net = Net(parse_net(contrastive_net(params, a.shape, b.shape, y.shape, extra)))
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    out = net(a=ta, b=tb, y=ty)
    net.loss.backward()
    assert ty.grad is None  # the similarity label gets no gradient
    return out["loss"], ta.grad.numpy(), tb.grad.numpy()


CONTRASTIVE_CASES = [  # (contrastive_loss_param, margin, legacy, shapes, loss_weight)
    ("", 1.0, False, ((6, 3), (6, 3), (6,)), 1.0),
    ("margin: 2.5", 2.5, False, ((6, 3, 1, 1), (6, 3, 1, 1), (6, 1, 1, 1)), 1.0),
    ("legacy_version: true", 1.0, True, ((6, 3), (6, 3, 1), (6, 1)), 1.0),
    ("legacy_version: true margin: 3", 3.0, True, ((6, 3), (6, 3), (6,)), 0.25),
    ("margin: 1.7", 1.7, False, ((6, 3), (6, 3), (6,)), 3.0),
]


@pytest.mark.parametrize("params,margin,legacy,shapes,weight", CONTRASTIVE_CASES)
def test_contrastive_matches_caffe(params, margin, legacy, shapes, weight):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(shapes[0]) * 0.6).astype(np.float32)
    b = (rng.standard_normal(shapes[1]) * 0.6).astype(np.float32)
    # similar: int(v) != 0 (1, 2, -1); dissimilar: 0 and 0.7, which truncates to 0
    y = np.array([1, 0, 0.7, 2, 0, -1], np.float32).reshape(shapes[2])
    loss, ga, gb = run_contrastive(params, a, b, y, extra=f"loss_weight: {weight}")
    want, want_a, want_b = caffe_contrastive(a, b, y, margin, legacy, weight)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(ga, want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb, want_b, rtol=1e-5, atol=1e-7)


def test_contrastive_caffe_rules_at_the_edges():
    a = np.array([[1.0, 0.0], [0.3, 0.4], [0.01, 0.0], [5.0, 5.0]], np.float32)
    b = np.array([[0.0, 0.0], [0.3, 0.4], [0.0, 0.0], [0.0, 0.0]], np.float32)
    y = np.zeros(4, np.float32)
    # legacy: margin - d^2 == 0 for pair 0 gives 0 (Caffe needs mdist > 0), unlike a clamp's 1
    _, ga, _ = run_contrastive("legacy_version: true", a, b, y)
    assert ga[0].tolist() == [0.0, 0.0]
    # current: d == 0 stays finite (pair 1), and a small d divides by d + 1e-4 (pair 2)
    loss, ga, gb = run_contrastive("", a, b, y)
    want, want_a, want_b = caffe_contrastive(a, b, y)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(ga, want_a, rtol=1e-6)
    assert np.all(np.isfinite(ga)) and ga[1].tolist() == [0.0, 0.0]
    exact = -(1 - 0.01) / 0.01 * 0.01 / 4  # autograd's d/da of (margin - d)^2 / 2N
    assert ga[2, 0] == pytest.approx(-(1 - 0.01) / (0.01 + 1e-4) * 0.01 / 4, rel=1e-5)
    assert abs(ga[2, 0] - exact) > 1e-3 * abs(exact)
    np.testing.assert_array_equal(gb, -ga)


def test_contrastive_shape_errors():
    def build(**shapes):
        return Net(parse_net(contrastive_net(**shapes)))

    with pytest.raises(CaffeAlexError, match=r"layer 'loss' \(ContrastiveLoss\).*channels"):
        build(a=(4, 3), b=(4, 2))
    with pytest.raises(CaffeAlexError, match="bottom a must have height and width 1"):
        build(a=(4, 3, 2), b=(4, 3, 2))
    with pytest.raises(CaffeAlexError, match="bottom the label must have channels"):
        build(label=(4, 2))
    with pytest.raises(CaffeAlexError, match="same first dimension"):
        build(b=(3, 3))
    with pytest.raises(CaffeAlexError, match="holds 2 values for 4 pairs"):
        build(label=(2,))
    with pytest.raises(CaffeAlexError, match="loss_param.normalization is not supported"):
        Net(parse_net(contrastive_net(extra="loss_param { normalization: FULL }")))


@pytest.mark.parametrize("params", ["", "legacy_version: true margin: 100"])
def test_contrastive_gradcheck(params):
    # Pairs far apart (d ~ 5, margin 10 for the current form): there Caffe's 1e-4 in
    # d + 1e-4 is below gradcheck's tolerance; the edge test above checks it exactly.
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 3
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    text = contrastive_net(params or "margin: 10")
    feed = {"a": a, "b": b, "y": y}
    gradcheck_net(text, outputs=["loss"], inputs=feed, check_inputs=["a", "b"])


@pytest.mark.gpu
def test_margin_losses_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    y = torch.tensor([1.0, 0, 0, 1, 0, 1])
    hinge = Net(parse_net(loss_net("HingeLoss", (6, 3), (6,), "hinge_loss_param { norm: L2 }")))
    contrastive = Net(parse_net(contrastive_net(a=(6, 3), b=(6, 3), label=(6,))))
    for net, feed in ((hinge, {"s": a, "l": y}), (contrastive, {"a": a, "b": b, "y": y})):
        results = []
        for device in ("cpu", "cuda"):
            net.to(device)
            first = next(iter(feed))
            inputs = {k: v.to(device) for k, v in feed.items()}
            inputs[first].requires_grad_()
            loss = net(**inputs)["loss"]
            loss.backward()
            results.append((loss.detach().cpu(), inputs[first].grad.cpu()))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
