"""MultinomialLogisticLoss and InfogainLoss against NumPy transcriptions of Caffe's
multinomial_logistic_loss_layer.cpp and infogain_loss_layer.cpp (forward and backward loops in
float32), and float64 gradcheck. OpenCV 4's Caffe importer has neither ("Can't create layer ...
of type InfogainLoss"), so there is no OpenCV comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.caffemodel import write_binaryproto
from caffe_alex.net import Net
from tests.reference import gradcheck_net, loss_net, parse_net

f32 = np.float32
LOG_THRESHOLD = f32(1e-20)
MODES = {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}


def caffe_multinomial(p, label, loss_weight=1.0):
    num = p.shape[0]
    rows = p.astype(f32).reshape(num, -1)
    loss, grad = f32(0), np.zeros_like(rows)
    scale = f32(-f32(loss_weight) / num)
    for i in range(num):
        k = int(label.reshape(-1)[i])
        prob = max(rows[i, k], LOG_THRESHOLD)
        loss -= np.log(prob)
        grad[i, k] = scale / prob
    return loss / num, grad.reshape(p.shape)


def run_multinomial(p, label, extra=""):
    net = Net(parse_net(loss_net("MultinomialLogisticLoss", p.shape, label.shape, extra=extra)))
    tp, tl = torch.tensor(p, requires_grad=True), torch.tensor(label, requires_grad=True)
    out = net(s=tp, l=tl)
    net.loss.backward()
    assert tl.grad is None
    return out["loss"], tp.grad.numpy()


@pytest.mark.parametrize(
    "p_shape,l_shape,weight",
    [((5, 4), (5,), 1.0), ((3, 2, 2, 2), (3, 1, 1, 1), 2.0), ((4, 3, 2), (4, 1), 0.5)],
)
def test_multinomial_matches_caffe(p_shape, l_shape, weight):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((p_shape[0], int(np.prod(p_shape[1:]))))
    p = (np.exp(x) / np.exp(x).sum(1, keepdims=True)).astype(f32).reshape(p_shape)
    p.reshape(p_shape[0], -1)[0, :] = 0.0  # p == 0 and p below 1e-20 hit the clamp
    p.reshape(p_shape[0], -1)[1, :] = 1e-30
    label = (rng.integers(0, p[0].size, size=l_shape) + 0.5).astype(f32)  # truncated
    loss, grad = run_multinomial(p, label, extra=f"loss_weight: {weight}")
    want, want_grad = caffe_multinomial(p, label, weight)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
    # past the clamp Caffe's gradient is -1/(N * 1e-20), not autograd-of-max's 0
    k = int(label.reshape(-1)[0])
    assert grad.reshape(p_shape[0], -1)[0, k] == pytest.approx(-weight / p_shape[0] / 1e-20)


def test_multinomial_errors():
    def build(p_shape, l_shape, params=""):
        return Net(parse_net(loss_net("MultinomialLogisticLoss", p_shape, l_shape, params)))

    with pytest.raises(CaffeAlexError, match=r"'loss' \(MultinomialLogisticLoss\).*height and"):
        build((3, 4), (3, 2))
    with pytest.raises(CaffeAlexError, match="same first dimension"):
        build((3, 4), (2,))
    with pytest.raises(CaffeAlexError, match="at most 4 axes"):
        build((3, 2, 2, 2, 2), (3,))
    with pytest.raises(CaffeAlexError, match="loss_param.normalization is not supported"):
        build((3, 4), (3,), "loss_param { normalization: FULL }")
    net = build((2, 3), (2,))
    with pytest.raises(CaffeAlexError, match=r"'loss' \(MultinomialLogisticLoss\): label -1 out"):
        net(s=torch.full((2, 3), 0.3), l=torch.tensor([0.0, -1.0]))


def test_multinomial_gradcheck():
    gen = torch.Generator().manual_seed(2)
    p = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1
    text = loss_net("MultinomialLogisticLoss", (3, 4), (3,))
    gradcheck_net(
        text, outputs=["loss"], inputs={"s": p, "l": torch.tensor([0.0, 3, 1])}, check_inputs=["s"]
    )


# ---- InfogainLoss ----------------------------------------------------------------------------


def normalizer(mode, outer, inner, valid):
    return max(1.0, float({0: outer * inner, 1: valid, 2: outer, 3: 1}[mode]))


def caffe_infogain(x, label, h, axis, mode=1, ignore=None, loss_weight=1.0):
    """InfogainLossLayer::Forward_cpu / Backward_cpu as loops (float32 softmax probabilities)."""
    outer, k = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1 :]))
    s = x.astype(f32).reshape(outer, k, inner)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    prob = (e / e.sum(axis=1, keepdims=True)).astype(f32)
    h = h.astype(f32).reshape(k, k)
    row_sums = h.sum(axis=1, dtype=f32)
    lab = label.reshape(outer, inner)
    loss, valid, grad = 0.0, 0, np.zeros_like(prob)
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            loss -= (h[v] * np.log(np.maximum(prob[i, :, j], LOG_THRESHOLD))).sum()
            grad[i, :, j] = prob[i, :, j] * row_sums[v] - h[v]
            valid += 1
    norm = normalizer(mode, outer, inner, valid)
    return loss / norm, (grad * f32(loss_weight) / norm).reshape(x.shape), prob.reshape(x.shape)


def dims(shape):
    return " ".join(f"dim: {d}" for d in shape)


def infogain_net(s_shape, l_shape, h_shape=None, params="", tops=("loss",), extra=""):
    """Scores s, labels l and (with ``h_shape``) H as a third bottom."""
    h_top = ' top: "H"' if h_shape else ""
    h_dims = f" shape {{ {dims(h_shape)} }}" if h_shape else ""
    h_bottom = ' bottom: "H"' if h_shape else ""
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "infogain_test"
layer {{ name: "in" type: "Input" top: "s" top: "l"{h_top}
  input_param {{ shape {{ {dims(s_shape)} }} shape {{ {dims(l_shape)} }}{h_dims} }} }}
layer {{ name: "loss" type: "InfogainLoss" bottom: "s" bottom: "l"{h_bottom} {top_lines}
  {extra} {params} }}
"""


def h_file(tmp_path, h, name="H.binaryproto"):
    path = tmp_path / name
    write_binaryproto(path, h.reshape(1, 1, *h.shape))  # Caffe's usual 1 x 1 x K x K
    return path


INFOGAIN_CASES = [  # (scores, labels, axis, loss_param, ignore)
    ((6, 5), (6,), 1, "", None),
    ((4, 2, 5, 2), (4, 2, 1, 2), 2, "", None),  # Caffe's own test layout
    ((3, 4, 2, 3), (3, 2, 3), 1, "ignore_label: 2", 2),
    ((2, 3, 4), (2, 3), -1, "normalization: FULL ignore_label: 0", 0),
    ((3, 4, 2), (3, 2), 1, "normalization: BATCH_SIZE ignore_label: 1", 1),
    ((3, 4, 2), (3, 2), 1, "normalization: NONE", None),
    ((3, 4, 2), (3, 2), 1, "normalization: VALID ignore_label: 3", 3),
]


def infogain_inputs(s_shape, l_shape, axis, seed=3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(s_shape) * 2).astype(f32)
    k = s_shape[axis]
    label = (rng.integers(0, k, size=l_shape) + 0.4).astype(f32)  # truncated like Caffe
    h = rng.uniform(0.1, 2.0, (k, k)).astype(f32)
    return x, label, h


def check_infogain(net, x, label, h, axis, params, ignore, with_bottom, weight=1.0):
    s = torch.tensor(x, requires_grad=True)
    feed = {"s": s, "l": torch.tensor(label)}
    if with_bottom:
        feed["H"] = torch.tensor(h).reshape(net.blob_shapes["H"]).requires_grad_()
    out = net(**feed)
    net.loss.backward()
    mode = next((v for n, v in MODES.items() if f"normalization: {n}" in params), 1)
    want, want_grad, want_prob = caffe_infogain(x, label, h, axis % x.ndim, mode, ignore, weight)
    assert out["loss"].shape == ()
    np.testing.assert_allclose(out["loss"].item(), want, rtol=2e-6)
    np.testing.assert_allclose(s.grad.numpy(), want_grad, rtol=1e-5, atol=1e-7)
    if with_bottom:
        assert feed["H"].grad is None  # Caffe refuses to backpropagate to H
    return out


@pytest.mark.parametrize("s_shape,l_shape,axis,params,ignore", INFOGAIN_CASES)
def test_infogain_from_file_matches_caffe(tmp_path, s_shape, l_shape, axis, params, ignore):
    x, label, h = infogain_inputs(s_shape, l_shape, axis)
    text = infogain_net(
        s_shape,
        l_shape,
        params=f'infogain_loss_param {{ axis: {axis} source: "{h_file(tmp_path, h)}" }} '
        f"loss_param {{ {params} }}",
        tops=("loss", "prob"),
        extra="loss_weight: 2 loss_weight: 0",
    )
    net = Net(parse_net(text))
    assert "loss" not in net.params  # H is read into the layer, not a learnable blob
    out = check_infogain(net, x, label, h, axis, params, ignore, False, weight=2.0)
    want_prob = caffe_infogain(x, label, h, axis % x.ndim)[2]
    np.testing.assert_allclose(out["prob"].numpy(), want_prob, rtol=1e-6, atol=1e-7)
    assert not out["prob"].requires_grad  # Caffe's backward ignores the probability top


@pytest.mark.parametrize("s_shape,l_shape,axis,params,ignore", INFOGAIN_CASES[::2])
def test_infogain_from_bottom_matches_caffe(s_shape, l_shape, axis, params, ignore):
    x, label, h = infogain_inputs(s_shape, l_shape, axis, seed=4)
    k = s_shape[axis]
    text = infogain_net(
        s_shape,
        l_shape,
        h_shape=(1, 1, k, k),
        params=f"infogain_loss_param {{ axis: {axis} }} loss_param {{ {params} }}",
    )
    check_infogain(Net(parse_net(text)), x, label, h, axis, params, ignore, True)


def test_infogain_clamps_the_log_but_not_the_gradient():
    x = np.array([[0.0, 200.0, -200.0]], f32)  # p[2] underflows to 0
    h = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0.25, 2]], f32)
    text = infogain_net((1, 3), (1,), h_shape=(3, 3))
    net = Net(parse_net(text))
    s = torch.tensor(x, requires_grad=True)
    loss = net(s=s, l=torch.tensor([2.0]), H=torch.tensor(h))["loss"]
    loss.backward()
    want, want_grad, _ = caffe_infogain(x, np.array([2.0]), h, 1)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), want_grad, atol=1e-6)
    assert s.grad[0, 2].item() == pytest.approx(-2.0)  # p * rowsum - H, p == 0


def test_infogain_all_ignored_is_zero():
    text = infogain_net((3, 4), (3,), h_shape=(4, 4), params="loss_param { ignore_label: 9 }")
    net = Net(parse_net(text))
    s = torch.ones(3, 4, requires_grad=True)
    loss = net(s=s, l=torch.full((3,), 9.0), H=torch.eye(4))["loss"]
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


def test_infogain_with_identity_is_softmax_with_loss():
    x, label, _ = infogain_inputs((4, 5, 3), (4, 3), 1, seed=5)
    info = Net(parse_net(infogain_net((4, 5, 3), (4, 3), h_shape=(5, 5))))
    soft = Net(parse_net(loss_net("SoftmaxWithLoss", (4, 5, 3), (4, 3))))
    feed = {"s": torch.tensor(x), "l": torch.tensor(label)}
    torch.testing.assert_close(info(**feed, H=torch.eye(5))["loss"], soft(**feed)["loss"])


def test_infogain_setup_errors(tmp_path):
    def build(params, h_shape=None, s_shape=(3, 4), l_shape=(3,)):
        return Net(parse_net(infogain_net(s_shape, l_shape, h_shape, params=params)))

    path = h_file(tmp_path, np.eye(3, dtype=f32))
    with pytest.raises(CaffeAlexError, match=r"layer 'loss' \(InfogainLoss\).*source.*must be"):
        build("")
    with pytest.raises(CaffeAlexError, match=r"'loss' \(InfogainLoss\).*no such file.*nope"):
        build(f'infogain_loss_param {{ source: "{tmp_path / "nope"}" }}')
    with pytest.raises(CaffeAlexError, match=r"H must be 4x4 \(16 values\).*source holds 9"):
        build(f'infogain_loss_param {{ source: "{path}" }}')
    with pytest.raises(CaffeAlexError, match=r"H must be 4x4.*bottom 2 holds 12"):
        build("", h_shape=(3, 4))
    with pytest.raises(CaffeAlexError, match="loss_param.normalize .*deprecated"):
        build("loss_param { normalize: true }", h_shape=(4, 4))
    with pytest.raises(CaffeAlexError, match="need 6 labels"):
        build("", h_shape=(4, 4), s_shape=(3, 4, 2), l_shape=(3, 1))
    with pytest.raises(CaffeAlexError, match="same first dimension"):
        build("", h_shape=(4, 4), l_shape=(2,))
    with pytest.raises(CaffeAlexError, match="infogain_loss_param.axis"):
        build("infogain_loss_param { axis: 2 }", h_shape=(4, 4))
    net = build("loss_param { ignore_label: 7 }", h_shape=(4, 4))
    with pytest.raises(CaffeAlexError, match=r"\(InfogainLoss\): label 4 out of range.*\[0, 3\]"):
        net(s=torch.zeros(3, 4), l=torch.tensor([7.0, 0.0, 4.0]), H=torch.eye(4))


@pytest.mark.parametrize("params", ["", "loss_param { ignore_label: 1 normalization: FULL }"])
def test_infogain_gradcheck(params):
    gen = torch.Generator().manual_seed(6)
    h = torch.rand(3, 3, generator=gen, dtype=torch.float64) + 0.1
    label = torch.tensor([[0.0, 1, 2], [1, 2, 0]])
    text = infogain_net((2, 3, 3), (2, 3), h_shape=(3, 3), params=params)
    gradcheck_net(text, outputs=["loss"], inputs={"l": label, "H": h}, check_inputs=["s"])


def test_infogain_source_follows_dtype_and_compiles(tmp_path):
    x, label, h = infogain_inputs((2, 3, 2), (2, 2), 1, seed=7)
    text = infogain_net(
        (2, 3, 2), (2, 2), params=f'infogain_loss_param {{ source: "{h_file(tmp_path, h)}" }}'
    )
    net = Net(parse_net(text))
    feed = {"s": torch.tensor(x), "l": torch.tensor(label)}
    ref = net(**feed)["loss"]
    assert net.double()(s=feed["s"].double(), l=feed["l"])["loss"].dtype == torch.float64
    net.float()
    layer = net.layer("loss")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feed["s"], feed["l"]), ref)


@pytest.mark.gpu
def test_log_losses_on_cuda_match_cpu(tmp_path):
    x, label, h = infogain_inputs((4, 3, 5), (4, 5), 1, seed=8)
    text = infogain_net(
        (4, 3, 5),
        (4, 5),
        params=f'infogain_loss_param {{ source: "{h_file(tmp_path, h)}" }} '
        "loss_param { ignore_label: 1 }",
    )
    probs = torch.softmax(torch.tensor(x), 1).reshape(4, 15)
    cases = [
        (Net(parse_net(text)), {"s": torch.tensor(x), "l": torch.tensor(label)}),
        (
            Net(parse_net(loss_net("MultinomialLogisticLoss", (4, 15), (4,)))),
            {"s": probs, "l": torch.tensor([0.0, 14, 3, 7])},
        ),
    ]
    for net, feed in cases:
        results = []
        for device in ("cpu", "cuda"):
            net.to(device)
            s = feed["s"].to(device).requires_grad_()
            loss = net(s=s, l=feed["l"].to(device))["loss"]
            loss.backward()
            results.append((loss.detach().cpu(), s.grad.cpu()))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
