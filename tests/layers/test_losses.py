"""Loss layers against NumPy transcriptions of Caffe's forward and backward loops.

OpenCV 4's Caffe importer has none of these layers ("Can't create layer ... of type
SoftmaxWithLoss"), so the references are Caffe's formulas written out per element.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import gradcheck_net, loss_net, parse_net

FLT_MIN = np.float32(np.finfo(np.float32).tiny)
MODES = {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}


def run(text, s, label, phase="TEST"):
    net = Net(parse_net(text), phase)
    s = torch.tensor(s, requires_grad=True)
    out = net(s=s, l=torch.tensor(label))
    net.loss.backward()
    return net, out, s.grad.numpy()


def normalizer(mode, outer, inner, valid):
    n = {0: outer * inner, 1: valid, 2: outer, 3: 1}[mode]
    return max(1.0, float(n))


def caffe_softmax_loss(x, label, axis, mode, ignore=None):
    """SoftmaxWithLossLayer::Forward_cpu / Backward_cpu as loops (float32 probabilities)."""
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1 :]))
    s = x.reshape(outer, c, inner).astype(np.float32)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    prob = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    lab = label.reshape(outer, inner)
    loss, valid, grad = 0.0, 0, prob.astype(np.float64).copy()
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                grad[i, :, j] = 0
                continue
            loss -= np.log(max(prob[i, v, j], FLT_MIN))
            grad[i, v, j] -= 1
            valid += 1
    norm = normalizer(mode, outer, inner, valid if ignore is not None else outer * inner)
    return loss / norm, (grad / norm).reshape(x.shape), prob.reshape(x.shape)


SOFTMAX_CASES = [  # (scores shape, label shape, axis, loss_param, ignore)
    ((6, 5), (6,), 1, "", None),
    ((4, 3, 3, 2), (4, 1, 3, 2), 1, "", None),  # segmentation-style labels
    ((4, 3, 3, 2), (4, 3, 2), 1, "ignore_label: 1", 1),
    ((2, 3, 4, 5), (2, 3, 4), -1, "normalization: FULL ignore_label: 0", 0),
    ((2, 5, 3), (2, 3), 1, "normalization: BATCH_SIZE ignore_label: 2", 2),
    ((2, 5, 3), (2, 3), 1, "normalization: NONE", None),
    ((3, 4, 5), (3, 4), 2, "normalization: VALID ignore_label: 4", 4),
    ((6, 5), (6,), 1, "normalize: false", None),  # legacy: BATCH_SIZE
    ((2, 5, 3), (2, 3), 1, "normalize: true ignore_label: 0", 0),  # legacy: VALID
    ((2, 5, 3), (2, 3), 1, "normalize: true normalization: NONE", None),  # explicit one wins
]


def expected_mode(params):
    for name, value in MODES.items():
        if f"normalization: {name}" in params:
            return value
    return 2 if "normalize: false" in params else 1


@pytest.mark.parametrize("s_shape,l_shape,axis,params,ignore", SOFTMAX_CASES)
def test_softmax_loss_matches_caffe(s_shape, l_shape, axis, params, ignore):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(s_shape) * 3).astype(np.float32)
    c = s_shape[axis]
    label = rng.integers(0, c, size=l_shape).astype(np.float32) + 0.25  # truncated like Caffe
    text = loss_net(
        "SoftmaxWithLoss",
        s_shape,
        l_shape,
        tops=("loss", "prob"),
        extra="loss_weight: 1 loss_weight: 0",  # Caffe wants one weight per top here
        params=f"loss_param {{ {params} }} softmax_param {{ axis: {axis} }}",
    )
    net, out, grad = run(text, x, label)
    ax = axis % len(s_shape)
    want, want_grad, want_prob = caffe_softmax_loss(x, label, ax, expected_mode(params), ignore)
    assert out["loss"].shape == ()
    np.testing.assert_allclose(out["loss"].item(), want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["prob"].numpy(), want_prob, rtol=1e-6, atol=1e-7)
    assert not out["prob"].requires_grad  # Caffe's backward ignores the probability top


def test_softmax_loss_all_ignored_is_zero():
    text = loss_net("SoftmaxWithLoss", (3, 4), (3,), params="loss_param { ignore_label: 7 }")
    net, out, grad = run(text, np.ones((3, 4), np.float32), np.full(3, 7, np.float32))
    assert out["loss"].item() == 0.0 and not np.isnan(out["loss"].item())
    assert np.all(grad == 0)


def test_softmax_loss_clamps_at_flt_min_but_keeps_gradient():
    x = np.array([[0.0, 200.0, -200.0]], np.float32)
    text = loss_net("SoftmaxWithLoss", (1, 3), (1,))
    _, out, grad = run(text, x, np.array([2.0], np.float32))
    want, want_grad, _ = caffe_softmax_loss(x, np.array([2.0]), 1, 1)
    np.testing.assert_allclose(out["loss"].item(), -np.log(FLT_MIN), rtol=1e-7)
    np.testing.assert_allclose(out["loss"].item(), want, rtol=1e-7)
    np.testing.assert_allclose(grad, want_grad, atol=1e-7)  # p - onehot, not 0
    assert grad[0, 2] == pytest.approx(-1.0)


@pytest.mark.parametrize("normalization", ["VALID", "NONE"])
@pytest.mark.parametrize("rows,spread", [(10, 1.0), (64, 3.0), (4, 300.0)])
def test_softmax_loss_skips_the_clamp_only_where_it_changes_nothing(
    rows, spread, normalization, monkeypatch
):
    """Where the picked -log p sum to at most -log(FLT_MIN), no single one is clamped and the
    loss is taken without the clamp's ops (by VALID, as nll_loss's mean; by NONE, its sum);
    the values and gradients are the clamped path's (a sum, then a division), bit for bit.
    Larger sums (64 rows, or scores hundreds apart, one clamped) take the clamped path."""
    from caffe_alex.layers import losses
    from tests.test_small_nets import Ops

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 5, generator=gen) * spread
    label = torch.randint(0, 5, (rows,), generator=gen).float()
    params = f"loss_param {{ normalization: {normalization} }}"
    text = loss_net("SoftmaxWithLoss", (rows, 5), (rows,), params=params)

    def loss_and_grad():
        net = Net(parse_net(text))
        s = x.clone().requires_grad_()
        with Ops() as counted:
            net(s=s, l=label)
        net.loss.backward()
        return net.loss.detach(), s.grad, counted.ops

    loss, grad, ops = loss_and_grad()
    monkeypatch.setattr(losses, "_NO_CLAMP_BELOW", -1.0)  # always the clamped path
    clamped_loss, clamped_grad, clamped_ops = loss_and_grad()
    assert torch.equal(loss, clamped_loss) and torch.equal(grad, clamped_grad)
    picked = -torch.log_softmax(x, 1)[torch.arange(rows), label.long()]
    skipped = picked.sum().item() <= -np.log(FLT_MIN)
    assert skipped == (rows == 10)  # the cases are built so; the sum decides, not one term
    assert (ops["aten.clamp.default"] == 0) == skipped
    assert clamped_ops["aten.clamp.default"] == 1
    assert ops["aten.div.Tensor"] == (0 if skipped and normalization == "VALID" else 1)


def test_softmax_loss_label_count_mismatch_names_both_sizes():
    with pytest.raises(CaffeAlexError, match=r"layer 'loss'.*need 12 labels.*has 8"):
        Net(parse_net(loss_net("SoftmaxWithLoss", (4, 3, 3), (4, 2))))


def test_softmax_loss_channels_last_and_bf16():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((2, 4, 3, 3)), dtype=torch.float32)
    label = torch.tensor(rng.integers(0, 4, (2, 3, 3)), dtype=torch.float32)
    net = Net(parse_net(loss_net("SoftmaxWithLoss", (2, 4, 3, 3), (2, 3, 3))))
    plain = net(s=x, l=label)["loss"]
    cl = net(s=x.to(memory_format=torch.channels_last), l=label)["loss"]
    torch.testing.assert_close(cl, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(s=x.bfloat16(), l=label)["loss"]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("params", ["", "loss_param { ignore_label: 1 normalization: FULL }"])
def test_softmax_loss_gradcheck(params):
    label = torch.tensor([[0.0, 1, 2], [1, 1, 0]])
    text = loss_net("SoftmaxWithLoss", (2, 3, 3), (2, 3), params=params)
    gradcheck_net(text, outputs=["loss"], inputs={"l": label}, check_inputs=["s"])


# -- caffe-segnet's class weighting (loss_param weight_by_label_freqs, class_weighting) ------
def segnet_softmax_loss(x, label, weights, normalize, ignore=None):
    """caffe-segnet's SoftmaxWithLossLayer Forward_cpu / Backward_cpu (axis 1) as loops: each
    element's -log p is scaled by its label's weight, the normalizer counts elements, and the
    backward scales the element's whole diff row (p - onehot) by that weight."""
    outer, c, inner = x.shape[0], x.shape[1], int(np.prod(x.shape[2:]))
    s = x.reshape(outer, c, inner).astype(np.float32)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    prob = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    lab = label.reshape(outer, inner)
    loss, count, grad = 0.0, 0, prob.astype(np.float64).copy()
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                grad[i, :, j] = 0
                continue
            loss -= np.log(max(prob[i, v, j], FLT_MIN)) * np.float32(weights[v])
            grad[i, v, j] -= 1
            grad[i, :, j] *= np.float32(weights[v])
            count += 1
    norm = count if normalize else outer
    return loss / norm, (grad / norm).reshape(x.shape)


SEGNET_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417)


@pytest.mark.parametrize(
    "s_shape,l_shape,normalize,ignore",
    [
        ((2, 4, 3, 5), (2, 1, 3, 5), True, None),
        ((2, 4, 3, 5), (2, 1, 3, 5), True, 2),  # SegNet's nets ignore a class this way
        ((3, 4, 6), (3, 6), False, 0),
        ((5, 4), (5,), True, None),
    ],
)
def test_segnet_class_weighting_matches_the_fork(s_shape, l_shape, normalize, ignore):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(s_shape) * 3).astype(np.float32)
    label = rng.integers(0, s_shape[1], size=l_shape).astype(np.float32)
    weights = " ".join(f"class_weighting: {w}" for w in SEGNET_WEIGHTS)
    ignore_field = "" if ignore is None else f"ignore_label: {ignore}"
    params = (
        f"loss_param {{ weight_by_label_freqs: true {weights} {ignore_field} "
        f"normalize: {'true' if normalize else 'false'} }}"
    )
    _, out, grad = run(loss_net("SoftmaxWithLoss", s_shape, l_shape, params=params), x, label)
    want, want_grad = segnet_softmax_loss(x, label, SEGNET_WEIGHTS, normalize, ignore)
    np.testing.assert_allclose(out["loss"].item(), want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    # the weights change the numbers: the unweighted loss differs
    plain = params.replace("weight_by_label_freqs: true", "")
    _, unweighted, _ = run(loss_net("SoftmaxWithLoss", s_shape, l_shape, params=plain), x, label)
    assert abs(unweighted["loss"].item() - want) > 1e-3


def test_class_weighting_without_weight_by_label_freqs_is_not_read():
    # the fork reads the weights only when weight_by_label_freqs is set (a wrong count too)
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    label = np.array([0, 3, 1], np.float32)
    params = "loss_param { class_weighting: 5 class_weighting: 7 }"
    _, out, _ = run(loss_net("SoftmaxWithLoss", (3, 4), (3,), params=params), x, label)
    want, _, _ = caffe_softmax_loss(x, label, 1, 1)
    np.testing.assert_allclose(out["loss"].item(), want, rtol=2e-6)


def test_class_weighting_count_must_match_the_channels():
    params = "loss_param { weight_by_label_freqs: true class_weighting: 1 class_weighting: 2 }"
    with pytest.raises(CaffeAlexError, match=r"layer 'loss'.*class_weighting has 2 values.*3 ch"):
        Net(parse_net(loss_net("SoftmaxWithLoss", (2, 3, 4), (2, 4), params=params)))
    # the fork counts axis 1's channels; another softmax axis with more classes would index
    # past the weights there
    params = params[:-2] + " class_weighting: 3 } softmax_param { axis: 2 }"
    with pytest.raises(CaffeAlexError, match=r"3 values .*softmax_param.axis 2 has 4 classes"):
        Net(parse_net(loss_net("SoftmaxWithLoss", (2, 3, 4), (2, 3), params=params)))


def test_segnet_class_weighting_gradcheck():
    label = torch.tensor([[0.0, 1, 2], [1, 2, 0]])
    params = (
        "loss_param { weight_by_label_freqs: true class_weighting: 0.5 class_weighting: 2 "
        "class_weighting: 3.5 ignore_label: 1 }"
    )
    text = loss_net("SoftmaxWithLoss", (2, 3, 3), (2, 3), params=params)
    gradcheck_net(text, outputs=["loss"], inputs={"l": label}, check_inputs=["s"])


def caffe_euclidean(a, b):
    diff = a.astype(np.float64) - b.reshape(a.shape)
    n = a.shape[0]
    return (diff**2).sum() / n / 2, diff / n, -diff.reshape(b.shape) / n


@pytest.mark.parametrize(
    "a_shape,b_shape", [((4, 3), (4, 3)), ((2, 3, 2, 2), (2, 12)), ((5,), (5,))]
)
def test_euclidean_loss_matches_caffe(a_shape, b_shape):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    net = Net(parse_net(loss_net("EuclideanLoss", a_shape, b_shape)))
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    out = net(s=ta, l=tb)
    net.loss.backward()
    want, ga, gb = caffe_euclidean(a, b)
    np.testing.assert_allclose(out["loss"].item(), want, rtol=1e-6)
    np.testing.assert_allclose(ta.grad.numpy(), ga, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tb.grad.numpy(), gb, rtol=1e-5, atol=1e-7)


def test_euclidean_loss_shape_errors_and_gradcheck():
    with pytest.raises(CaffeAlexError, match="same dimension"):
        Net(parse_net(loss_net("EuclideanLoss", (2, 3), (2, 4))))
    with pytest.raises(CaffeAlexError, match="same first dimension"):
        Net(parse_net(loss_net("EuclideanLoss", (2, 3), (3, 2))))
    with pytest.raises(CaffeAlexError, match="loss_param.normalization is not supported"):
        Net(
            parse_net(
                loss_net(
                    "EuclideanLoss", (2, 3), (2, 3), params="loss_param { normalization: FULL }"
                )
            )
        )
    gradcheck_net(loss_net("EuclideanLoss", (2, 3, 2), (2, 6)), outputs=["loss"])


def caffe_sigmoid_ce(x, t, mode, ignore=None):
    """SigmoidCrossEntropyLossLayer::Forward_cpu / Backward_cpu as loops."""
    xf, tf = x.reshape(-1).astype(np.float64), t.reshape(-1).astype(np.float64)
    loss, valid, grad = 0.0, 0, np.zeros_like(xf)
    for i in range(xf.size):
        if ignore is not None and int(tf[i]) == ignore:
            continue
        pos = float(xf[i] >= 0)
        loss -= xf[i] * (tf[i] - pos) - np.log(1 + np.exp(xf[i] - 2 * xf[i] * pos))
        grad[i] = 0.5 * np.tanh(0.5 * xf[i]) + 0.5 - tf[i]  # Caffe's sigmoid
        valid += 1
    norm = normalizer(
        mode, x.shape[0], xf.size // x.shape[0], valid if ignore is not None else xf.size
    )
    return loss / norm, (grad / norm).reshape(x.shape)


SIGMOID_CASES = [  # (loss_param, mode Caffe uses, ignore)
    ("", 2, None),  # BATCH_SIZE by default, not the proto's VALID
    ("loss_param { normalization: VALID ignore_label: -1 }", 1, -1),
    ("loss_param { normalization: FULL ignore_label: -1 }", 0, -1),
    ("loss_param { ignore_label: -1 }", 2, -1),
    ("loss_param { normalize: true ignore_label: -1 }", 1, -1),
    ("loss_param { normalize: false }", 2, None),
    ("loss_param { normalization: NONE }", 3, None),
]


@pytest.mark.parametrize("params,mode,ignore", SIGMOID_CASES)
def test_sigmoid_cross_entropy_matches_caffe(params, mode, ignore):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 4, 2)) * 4).astype(np.float32)
    x[0, 0, :] = [120.0, -120.0]  # large |x| must stay finite
    x[0, 1, :] = [1e4, -1e4]
    t = rng.uniform(0, 1, (3, 4, 2)).astype(np.float32)
    t[1, :, 0] = -1.0  # ignored where ignore_label is -1
    t[2, 0, 0] = -1.7  # truncates to -1: ignored as well
    t[2, 1, 0] = -0.5  # truncates to 0: kept
    _, out, grad = run(loss_net("SigmoidCrossEntropyLoss", (3, 4, 2), (3, 8), params=params), x, t)
    want, want_grad = caffe_sigmoid_ce(x, t, mode, ignore)
    assert np.isfinite(out["loss"].item())
    np.testing.assert_allclose(out["loss"].item(), want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_sigmoid_cross_entropy_gradcheck_and_count_error():
    text = """name: "sigmoid_ce"
layer { name: "in" type: "Input" top: "s" top: "l"
  input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "s" bottom: "l" top: "loss"
  loss_param { ignore_label: -1 normalization: VALID } }
"""
    target = torch.tensor([[0.0, 1, 0.3], [-1, 0.5, 1]])
    gradcheck_net(text, outputs=["loss"], inputs={"l": target}, check_inputs=["s"])
    with pytest.raises(CaffeAlexError, match="same count"):
        Net(parse_net(loss_net("SigmoidCrossEntropyLoss", (2, 3), (2, 4))))


def test_net_loss_weight_scales_the_loss():
    text = """name: "weighted"
layer { name: "in" type: "Input" top: "x" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "score"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_weight: 0.5 }
"""
    net = Net(parse_net(text))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    out = net(x=x, label=torch.tensor([0.0, 1, 2, 1]))
    torch.testing.assert_close(net.loss, 0.5 * out["loss"])
    net.loss.backward()
    assert net.params["ip"][0].grad is not None


def test_losses_compile_without_graph_breaks():
    net = Net(
        parse_net(
            loss_net("SoftmaxWithLoss", (2, 3, 2), (2, 2), params="loss_param { ignore_label: 0 }")
        )
    )
    layer = net.layer("loss")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, label = torch.randn(2, 3, 2), torch.tensor([[0.0, 1], [2, 0]])
    torch.testing.assert_close(compiled(x, label), layer(x, label))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,params",
    [
        ("SoftmaxWithLoss", "loss_param { ignore_label: 1 }"),
        (
            "SoftmaxWithLoss",
            "loss_param { weight_by_label_freqs: true class_weighting: 0.5 class_weighting: 2 "
            "class_weighting: 3 }",
        ),
        ("SigmoidCrossEntropyLoss", "loss_param { ignore_label: 1 normalization: VALID }"),
        ("EuclideanLoss", ""),
    ],
)
def test_losses_on_cuda_match_cpu(kind, params):
    net = Net(
        parse_net(
            loss_net(
                kind, (4, 3, 5), (4, 5) if kind == "SoftmaxWithLoss" else (4, 15), params=params
            )
        )
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=gen)
    label = torch.randint(0, 3, net.blob_shapes["l"], generator=gen).float()
    results = []
    for device in ("cpu", "cuda"):
        net.to(device)
        s = x.to(device).requires_grad_()
        loss = net(s=s, l=label.to(device))["loss"]
        loss.backward()
        results.append((loss.detach().cpu(), s.grad.cpu()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# -- labels that name no class (every layer that indexes by a label) -------------------------
def label_net(kind: str, params: str = "") -> Net:
    """Scores "s" (3 x 4), labels "l" (3) and, for InfogainLoss, H (4 x 4) into one layer."""
    h_input = 'top: "H"' if kind == "InfogainLoss" else ""
    h_shape = "shape { dim: 4 dim: 4 }" if kind == "InfogainLoss" else ""
    h_bottom = 'bottom: "H"' if kind == "InfogainLoss" else ""
    return Net(parse_net(f"""
layer {{ name: "in" type: "Input" top: "s" top: "l" {h_input}
  input_param {{ shape {{ dim: 3 dim: 4 }} shape {{ dim: 3 }} {h_shape} }} }}
layer {{ name: "L" type: "{kind}" bottom: "s" bottom: "l" {h_bottom} top: "out" {params} }}
"""))  # fmt: skip


def label_inputs(net: Net, labels) -> dict[str, torch.Tensor]:
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    inputs = {"s": scores, "l": torch.tensor(labels, dtype=torch.float32)}
    if "H" in net.input_names:
        inputs["H"] = torch.eye(4)
    return inputs


LABEL_LAYERS = {  # type -> the ignore_label field it takes ("" for none)
    "SoftmaxWithLoss": "loss_param",
    "Accuracy": "accuracy_param",
    "InfogainLoss": "loss_param",
    "MultinomialLogisticLoss": "",
    "HingeLoss": "",
}
BAD_LABELS = [2147483647.0, -3.0, float("nan"), float("inf"), 1e30, 4.0, -1.5]


@pytest.mark.parametrize("kind", list(LABEL_LAYERS))
@pytest.mark.parametrize("bad", BAD_LABELS)
def test_a_label_naming_no_class_is_one_error_with_its_item(kind, bad):
    net = label_net(kind)
    with pytest.raises(CaffeAlexError) as info:
        net(**label_inputs(net, [0.0, bad, 3.0]))
    error = info.value
    shown = "2147483648" if bad == 2147483647.0 else {4.0: "4", -3.0: "-3"}.get(bad, str(bad))
    assert f"layer 'L' ({kind}): label {shown} out of range (item 1 of the batch)" in str(error)
    assert "expected an integer in [0, 3]" in str(error)
    assert error.item == 1 and error.layer == "L"
    assert "\n" not in str(error)
    caffe = "only in debug builds" if LABEL_LAYERS[kind] else "does not check"
    assert caffe in str(error)


@pytest.mark.parametrize("kind", list(LABEL_LAYERS))
def test_labels_are_truncated_like_caffes_static_cast(kind):
    net = label_net(kind)
    truncated = net(**label_inputs(net, [0.9, 1.5, 3.99]))["out"]  # classes 0, 1, 3
    whole = net(**label_inputs(net, [0.0, 1.0, 3.0]))["out"]
    torch.testing.assert_close(truncated, whole)


@pytest.mark.parametrize("kind", [k for k, field in LABEL_LAYERS.items() if field])
def test_ignore_label_is_honoured_also_outside_the_classes(kind):
    field = LABEL_LAYERS[kind]
    net = label_net(kind, f"{field} {{ ignore_label: -1 }}")
    out = net(**label_inputs(net, [0.0, -1.0, -1.5]))["out"]  # -1.5 truncates to -1
    assert torch.isfinite(out).all()
    with pytest.raises(
        CaffeAlexError, match=r"label -2 out of range \(item 2.*or the ignore_label"
    ):
        net(**label_inputs(net, [0.0, -1.0, -2.0]))


def test_the_label_item_is_the_index_along_the_batch_axis():
    text = loss_net("SoftmaxWithLoss", (2, 3, 2, 2), (2, 1, 2, 2))
    net = Net(parse_net(text))
    label = torch.zeros(2, 1, 2, 2)
    label[1, 0, 1, 0] = 7
    with pytest.raises(CaffeAlexError) as info:
        net(s=torch.randn(2, 3, 2, 2), l=label)
    assert info.value.item == 1 and info.value.label == 7


@pytest.mark.parametrize("kind", list(LABEL_LAYERS))
def test_an_unchecked_bad_label_selects_no_class(kind, monkeypatch):
    """Where labels are not checked (on a GPU, or compiling: no device sync), a bad label
    indexes nothing out of bounds: it selects no class."""
    monkeypatch.setattr("caffe_alex.layers.labels.tracing", lambda: True)
    net = label_net(kind)
    good = net(**label_inputs(net, [0.0, 1.0, 2.0]))["out"]
    for bad in (2147483647.0, -3.0, float("nan")):
        out = net(**label_inputs(net, [0.0, 1.0, bad]))["out"]
        assert torch.isfinite(out).all(), (kind, bad)
        if kind == "Accuracy":  # the sample with the bad label is a miss
            assert float(out) <= float(good)
    if kind == "SoftmaxWithLoss":  # it costs what the clamp allows: -log(FLT_MIN)
        inputs = label_inputs(net, [0.0, 1.0, -3.0])
        s = inputs["s"]
        expected = -torch.log_softmax(s, 1)[[0, 1], [0, 1]].sum() - np.log(FLT_MIN)
        torch.testing.assert_close(net(**inputs)["out"], expected / 3)


def test_bad_labels_compile_without_graph_breaks_or_bounds_errors():
    net = Net(parse_net(loss_net("SoftmaxWithLoss", (2, 3), (2,))))
    layer = net.layer("loss")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(torch.randn(2, 3), torch.tensor([1.0, 2147483647.0]))
    assert torch.isfinite(out)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(LABEL_LAYERS))
def test_bad_labels_on_cuda_select_no_class_without_a_device_assert(kind):
    net = label_net(kind)
    cpu = label_inputs(net, [0.0, 1.0, 2.0])
    net.to("cuda")
    good = net(**{k: v.cuda() for k, v in cpu.items()})["out"]
    bad = dict(cpu, l=torch.tensor([0.0, 2147483647.0, -3.0]))
    out = net(**{k: v.cuda() for k, v in bad.items()})["out"]
    torch.cuda.synchronize()  # a device-side assert would surface here
    assert torch.isfinite(out).all() and torch.isfinite(good).all()
