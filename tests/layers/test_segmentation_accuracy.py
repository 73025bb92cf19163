"""DeepLab v2's "SegAccuracy" against a NumPy transcription of its Forward_cpu and of the
fork's ConfusionMatrix (accuracy, avgRecall(false), avgJaccard)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import parse_net


def seg_net(s_shape, l_shape, params="", name="acc"):
    dims = [" ".join(f"dim: {d}" for d in shape) for shape in (s_shape, l_shape)]
    text = f"""
    layer {{ name: "in" type: "Input" top: "s" top: "l"
             input_param {{ shape {{ {dims[0]} }} shape {{ {dims[1]} }} }} }}
    layer {{ name: "{name}" type: "SegAccuracy" bottom: "s" bottom: "l" top: "acc"
             seg_accuracy_param {{ {params} }} }}
    """
    return Net(parse_net(text), "TEST")


class ForkSegAccuracy:
    """seg_accuracy_layer.cpp with util/confusion_matrix.cpp, as loops."""

    def __init__(self, channels, ignore=(), reset=True):
        self.matrix = np.zeros((channels, channels), np.int64)
        self.ignore, self.reset = set(ignore), reset

    def forward(self, scores, label):
        n, c, h, w = scores.shape
        if self.reset:
            self.matrix[:] = 0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    # partial_sort of (score, class) with std::greater: the top pair wins
                    pairs = sorted(((scores[i, k, y, x], k) for k in range(c)), reverse=True)
                    gt = int(label[i, 0, y, x])
                    if gt in self.ignore:
                        continue
                    assert 0 <= gt < c
                    self.matrix[gt, pairs[0][1]] += 1
        return self.report()

    def report(self):
        m = self.matrix.astype(np.float64)
        total, diag = m.sum(), np.trace(m)
        accuracy = 0.0 if total == 0 else diag / total
        recall, classes = 0.0, 0
        for i in range(len(m)):
            if m[i].sum() > 0:
                recall += m[i, i] / m[i].sum()
                classes += 1
        mean_recall = 0.0 if classes == 0 else recall / classes
        jaccard = 0.0
        for i in range(len(m)):
            inter, union = m[i, i], m[i].sum() + m[:, i].sum() - m[i, i]
            jaccard += 1.0 if inter == union else inter / union
        return np.array([accuracy, mean_recall, jaccard / len(m)], np.float32).reshape(1, 1, 1, 3)


def random_batch(rng, n, c, h, w, ignore=(255,), ties=False):
    scores = rng.standard_normal((n, c, h, w)).astype(np.float32)
    if ties:  # whole-number scores in a small range: many ties between classes
        scores = rng.integers(0, 3, (n, c, h, w)).astype(np.float32)
    label = rng.integers(0, c, (n, 1, h, w)).astype(np.float32)
    if ignore:
        label[rng.random(label.shape) < 0.2] = ignore[0]
    return scores, label


@pytest.mark.parametrize(
    "params,ignore,ties",
    [
        ("ignore_label: 255", (255,), False),
        ("ignore_label: 255 ignore_label: 0", (255, 0), True),
        ("", (), True),
        ("ignore_label: 255 metric: PixelIOU", (255,), False),  # metric changes nothing
    ],
)
def test_seg_accuracy_matches_the_fork(params, ignore, ties):
    rng = np.random.default_rng(0)
    net = seg_net((2, 5, 4, 6), (2, 1, 4, 6), params)
    fork = ForkSegAccuracy(5, ignore)
    for _ in range(2):
        scores, label = random_batch(rng, 2, 5, 4, 6, ignore[:1], ties)
        out = net(s=torch.from_numpy(scores), l=torch.from_numpy(label))["acc"]
        want = fork.forward(scores, label)
        assert out.shape == (1, 1, 1, 3) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-7)


def test_ties_go_to_the_higher_class():
    scores = np.zeros((1, 3, 1, 2), np.float32)  # all classes tie everywhere
    net = seg_net((1, 3, 1, 2), (1, 1, 1, 2))
    out = net(s=torch.from_numpy(scores), l=torch.tensor([[[[2.0, 0.0]]]]))["acc"]
    # pixel 0 labelled 2 is right (class 2 wins the tie), pixel 1 labelled 0 is wrong
    assert out.flatten().tolist()[0] == 0.5


def test_reset_false_keeps_counting_across_forwards():
    rng = np.random.default_rng(1)
    params = "ignore_label: 255 reset: false"
    net = seg_net((1, 4, 5, 5), (1, 1, 5, 5), params)
    once = seg_net((1, 4, 5, 5), (1, 1, 5, 5), "ignore_label: 255")
    fork = ForkSegAccuracy(4, (255,), reset=False)
    for step in range(3):
        scores, label = random_batch(rng, 1, 4, 5, 5)
        feed = {"s": torch.from_numpy(scores), "l": torch.from_numpy(label)}
        kept = net(**feed)["acc"]
        np.testing.assert_allclose(kept.numpy(), fork.forward(scores, label), rtol=1e-7)
        alone = once(**feed)["acc"]  # reset: true, the default: this batch only
        want = ForkSegAccuracy(4, (255,)).forward(scores, label)
        np.testing.assert_allclose(alone.numpy(), want, rtol=1e-7)
        assert step == 0 or not torch.equal(kept, alone)
    assert fork.matrix.sum() > 25  # three batches counted


def test_empty_matrix_and_absent_classes():
    net = seg_net((1, 3, 1, 2), (1, 1, 1, 2), "ignore_label: 255")
    out = net(s=torch.zeros(1, 3, 1, 2), l=torch.full((1, 1, 1, 2), 255.0))["acc"]
    assert out.flatten().tolist() == [0.0, 0.0, 1.0]  # nothing counted; every IoU is 1


def test_unexpected_label_stops_like_the_fork():
    net = seg_net((2, 3, 2, 2), (2, 1, 2, 2), "ignore_label: 255")
    label = torch.zeros(2, 1, 2, 2)
    label[1, 0, 1, 0] = 7
    with pytest.raises(CaffeAlexError) as caught:
        net(s=torch.zeros(2, 3, 2, 2), l=label)
    assert "layer 'acc' (SegAccuracy)" in str(caught.value)
    assert "unexpected label 7 (item 1, row 1, column 0)" in str(caught.value)
    assert caught.value.item == 1


@pytest.mark.parametrize(
    "s_shape,l_shape,message",
    [
        ((2, 3, 4, 4), (1, 1, 4, 4), r"data \(2\) and label \(1\) should have the same number"),
        ((2, 3, 4, 4), (2, 2, 4, 4), "label should have one channel"),
        ((2, 3, 4, 4), (2, 1, 4, 5), r"data \(4x4\) and label \(4x5\) should have the same"),
        ((2, 3, 4, 4, 1), (2, 1, 4, 4), "cannot use legacy accessors on a 5-axis blob"),
    ],
)
def test_shape_errors(s_shape, l_shape, message):
    with pytest.raises(CaffeAlexError, match=rf"layer 'acc' \(SegAccuracy\).*{message}"):
        seg_net(s_shape, l_shape)


def test_no_gradient_flows():
    net = seg_net((1, 3, 2, 2), (1, 1, 2, 2))
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    assert not net(s=s, l=torch.zeros(1, 1, 2, 2))["acc"].requires_grad


@pytest.mark.gpu
def test_on_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    scores, label = random_batch(rng, 2, 6, 16, 16, ties=True)
    results = []
    for device in ("cpu", "cuda"):
        net = seg_net((2, 6, 16, 16), (2, 1, 16, 16), "ignore_label: 255 reset: false").to(device)
        feed = {"s": torch.from_numpy(scores).to(device), "l": torch.from_numpy(label).to(device)}
        net(**feed)
        results.append(net(**feed)["acc"].cpu())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
