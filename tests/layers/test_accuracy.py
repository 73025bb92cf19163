"""Accuracy against a NumPy transcription of Caffe's AccuracyLayer::Forward_cpu loop.

OpenCV 4's Caffe importer cannot create Accuracy layers, so the loop is the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import loss_net, parse_net


def acc_net(s_shape, l_shape, params="", tops=("acc",)):
    return loss_net("Accuracy", s_shape, l_shape, f"accuracy_param {{ {params} }}", tops,
                    name="acc")  # fmt: skip


def caffe_accuracy(x, label, axis=1, top_k=1, ignore=None):
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1 :]))
    s, lab = x.reshape(outer, c, inner), label.reshape(outer, inner)
    hits, total = 0, 0
    nums, per_class = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            nums[v] += 1
            better = -1  # the true class counts itself
            for k in range(c):
                better += s[i, k, j] >= s[i, v, j]
            if better < top_k:
                hits += 1
                per_class[v] += 1
            total += 1
    per_class = np.where(nums == 0, 0, per_class / np.maximum(nums, 1))
    return (0.0 if total == 0 else hits / total), per_class


CASES = [  # (scores shape, label shape, accuracy_param, axis, top_k, ignore)
    ((20, 10), (20,), "", 1, 1, None),
    ((20, 10), (20,), "top_k: 5", 1, 5, None),
    ((4, 6, 3, 2), (4, 1, 3, 2), "top_k: 2", 1, 2, None),
    ((4, 6, 3, 2), (4, 3, 2), "ignore_label: 3", 1, 1, 3),
    ((3, 4, 7), (3, 4), "axis: -1 top_k: 3 ignore_label: 0", 2, 3, 0),
    ((8, 5), (8,), "top_k: 5", 1, 5, None),  # top_k == classes: always right
]


@pytest.mark.parametrize("s_shape,l_shape,params,axis,top_k,ignore", CASES)
def test_accuracy_matches_caffe(s_shape, l_shape, params, axis, top_k, ignore):
    rng = np.random.default_rng(0)
    # Few distinct values, so ties between the true class and others are common.
    x = rng.integers(0, 4, size=s_shape).astype(np.float32)
    label = rng.integers(0, s_shape[axis], size=l_shape).astype(np.float32)
    net = Net(parse_net(acc_net(s_shape, l_shape, params, tops=("acc", "per_class"))))
    out = net(s=torch.tensor(x), l=torch.tensor(label))
    want, want_per_class = caffe_accuracy(x, label, axis, top_k, ignore)
    assert out["acc"].shape == () and out["per_class"].shape == (s_shape[axis],)
    np.testing.assert_allclose(out["acc"].item(), want, rtol=1e-6)
    np.testing.assert_allclose(out["per_class"].numpy(), want_per_class, rtol=1e-6)


def test_tie_with_the_true_class_is_a_miss():
    x = torch.tensor([[1.0, 2.0, 2.0], [3.0, 1.0, 3.0], [0.0, 5.0, 1.0]])
    net = Net(parse_net(acc_net((3, 3), (3,))))
    out = net(s=x, l=torch.tensor([1.0, 0.0, 1.0]))
    assert out["acc"].item() == pytest.approx(1 / 3)  # only the untied last row counts
    net2 = Net(parse_net(acc_net((3, 3), (3,), "top_k: 2")))
    assert net2(s=x, l=torch.tensor([1.0, 0.0, 1.0]))["acc"].item() == 1.0


def test_all_ignored_gives_zero_and_no_gradient():
    net = Net(parse_net(acc_net((3, 4), (3,), "ignore_label: 2", tops=("acc", "pc"))))
    x = torch.randn(3, 4, requires_grad=True)
    out = net(s=x, l=torch.full((3,), 2.0))
    assert out["acc"].item() == 0.0 and torch.all(out["pc"] == 0)
    assert not out["acc"].requires_grad and not out["pc"].requires_grad


def test_shape_errors_name_the_layer():
    with pytest.raises(CaffeAlexError, match=r"layer 'acc'.*top_k \(6\)"):
        Net(parse_net(acc_net((4, 5), (4,), "top_k: 6")))
    with pytest.raises(CaffeAlexError, match=r"need 12 labels.*has 4"):
        Net(parse_net(acc_net((4, 5, 3), (4,), "")))


def test_accuracy_compiles_without_graph_breaks():
    net = Net(parse_net(acc_net((4, 5), (4,), "ignore_label: 1", tops=("acc", "pc"))))
    layer = net.layer("acc")
    x, label = torch.randn(4, 5), torch.tensor([0.0, 1, 4, 2])
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, label)
    for a, b in zip(got, layer(x, label), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_accuracy_on_cuda_matches_cpu():
    net = Net(parse_net(acc_net((6, 5, 2), (6, 2), "top_k: 2 ignore_label: 0", ("acc", "pc"))))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (6, 5, 2), generator=gen).float()
    label = torch.randint(0, 5, (6, 2), generator=gen).float()
    cpu = net(s=x, l=label)
    gpu = net.to("cuda")(s=x.cuda(), l=label.cuda())
    for name in ("acc", "pc"):
        torch.testing.assert_close(gpu[name].cpu(), cpu[name])


FEW_SCORES = [  # (scores, labels, accuracy_param): what the Python count must get right
    ([[1.0, 2.0, 2.0], [3.0, 1.0, 3.0], [0.0, 5.0, 1.0]], [1, 0, 1], ""),  # ties are misses
    ([[1.0, 2.0, 2.0], [3.0, 1.0, 3.0], [0.0, 5.0, 1.0]], [1, 0, 1], "top_k: 2"),
    ([[float("nan"), 1.0], [1.0, float("nan")], [2.0, 1.0]], [0, 0, 1], ""),  # NaN scores
    ([[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]], [1.9, -0.5, 0.0], ""),  # truncated toward zero
    ([[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]], [1, 255, 0], "ignore_label: 255"),
    ([[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]], [1, 0, 0], "ignore_label: 0"),
    ([[0.5, 0.2], [0.1, 0.9]], [255, 255], "ignore_label: 255"),  # all ignored: 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scores,labels,params", FEW_SCORES)
def test_few_scores_counted_in_python_equal_the_tensor_path(scores, labels, params, dtype,
                                                            monkeypatch):  # fmt: skip
    from caffe_alex.layers import accuracy
    from tests.test_small_nets import Ops

    x, label = torch.tensor(scores, dtype=dtype), torch.tensor(labels, dtype=torch.float32)
    layer = Net(parse_net(acc_net(tuple(x.shape), (len(labels),), params))).layer("acc")
    with Ops() as counted:
        in_python = layer(x, label)
    assert counted.total <= 3, counted.ops  # read out, counted, one tensor made: not the ops
    monkeypatch.setattr(accuracy, "_IN_PYTHON", -1)  # every size through the tensor ops
    with Ops() as counted:
        with_tensors = layer(x, label)
    assert counted.total > 3
    assert in_python.dtype == with_tensors.dtype == dtype
    assert torch.equal(in_python, with_tensors), (in_python, with_tensors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0, -1.0, 7.0])
def test_a_bad_label_among_few_scores_is_refused_as_by_the_tensor_path(bad):
    layer = Net(parse_net(acc_net((3, 2), (3,), "ignore_label: 7"))).layer("acc")
    label = torch.tensor([0.0, bad, 1.0])
    if bad == 7.0:  # the ignore_label, even outside the classes
        assert layer(torch.randn(3, 2), label).item() == pytest.approx(0.5, abs=0.5)
        return
    with pytest.raises(CaffeAlexError, match="layer 'acc'"):
        layer(torch.randn(3, 2), label)
