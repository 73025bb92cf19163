"""Filter and BatchReindex against NumPy transcriptions of Caffe's CPU loops, float64
gradcheck, Caffe's setup and runtime checks, and the refused backward to the selector/indices.

OpenCV 4's Caffe importer has neither type (it raises "Can't create layer"), so there is no
OpenCV comparison here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import gradcheck_net, parse_net


def dims(shape) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def filter_net(shapes, extra: str = "", n_tops: int | None = None) -> str:
    """Inputs b0 .. b{k-1} and the selector "sel" (the last shape); tops f0 .. f{k-1} (or
    ``n_tops`` of them)."""
    names = [f"b{i}" for i in range(len(shapes) - 1)] + ["sel"]
    tops = " ".join(f'top: "{n}"' for n in names)
    inputs = " ".join(f"shape {{ {dims(s)} }}" for s in shapes)
    bottoms = " ".join(f'bottom: "{n}"' for n in names)
    n_tops = len(shapes) - 1 if n_tops is None else n_tops
    outs = " ".join(f'top: "f{i}"' for i in range(n_tops))
    return f"""name: "filter_test"
layer {{ name: "in" type: "Input" {tops} input_param {{ {inputs} }} }}
layer {{ name: "filter" type: "Filter" {bottoms} {outs} {extra} }}
"""


def reindex_net(data_shape, n_idx, extra: str = "") -> str:
    return f"""name: "reindex_test"
layer {{ name: "in" type: "Input" top: "data" top: "idx"
  input_param {{ shape {{ {dims(data_shape)} }} shape {{ dim: {n_idx} }} }} }}
layer {{ name: "reindex" type: "BatchReindex" bottom: "data" bottom: "idx" top: "out" {extra} }}
"""


# -- Filter -----------------------------------------------------------------------------------
def caffe_filter(bottoms, selector, top_diffs=None):
    """FilterLayer: forward copies the items whose selector is nonzero; backward walks the
    bottom's items, copying the next forwarded item's diff and zeroing the rest."""
    keep = [n for n in range(selector.shape[0]) if selector.reshape(-1)[n]]
    tops = [np.stack([b[n] for n in keep]) if keep else b[:0] for b in bottoms]
    if top_diffs is None:
        return tops, None
    grads = []
    for b, d in zip(bottoms, top_diffs):
        g, nxt = np.empty_like(b), 0
        for n in range(b.shape[0]):
            if nxt < len(keep) and n == keep[nxt]:
                g[n], nxt = d[nxt], nxt + 1
            else:
                g[n] = 0
        grads.append(g)
    return tops, grads


@pytest.mark.parametrize(
    "shapes,selector",
    [
        ([(4, 3, 2), (4,)], [1, 0, 2, 0]),
        ([(5, 2), (5, 3, 1, 2), (5, 1, 1)], [0, 1, 1, 0, -0.5]),
        ([(3, 2), (3, 1)], [1, 1, 1]),
        ([(3, 2), (3, 1)], [0, float("nan"), 0]),  # NaN is "true" in C++
    ],
)
def test_filter_matches_caffe(shapes, selector):
    rng = np.random.default_rng(0)
    bottoms = [rng.standard_normal(s).astype(np.float32) for s in shapes[:-1]]
    sel = np.array(selector, np.float32).reshape(shapes[-1])
    net = Net(parse_net(filter_net(shapes)))
    # the build-time shapes are the upper bound (Caffe's first Reshape keeps every item)
    assert [net.blob_shapes[f"f{i}"] for i in range(len(bottoms))] == [
        tuple(s) for s in shapes[:-1]
    ]
    xs = [torch.from_numpy(b).requires_grad_() for b in bottoms]
    out = net(**{f"b{i}": x for i, x in enumerate(xs)}, sel=torch.from_numpy(sel))
    tops, _ = caffe_filter(bottoms, sel)
    diffs = [rng.standard_normal(t.shape).astype(np.float32) for t in tops]
    for i, (top, diff) in enumerate(zip(tops, diffs)):
        np.testing.assert_array_equal(out[f"f{i}"].detach().numpy(), top)
        out[f"f{i}"].backward(torch.from_numpy(diff))
    _, grads = caffe_filter(bottoms, sel, diffs)
    for x, g in zip(xs, grads):
        np.testing.assert_array_equal(x.grad.numpy(), g)


def test_filter_with_nothing_selected_gives_empty_tops():
    # Caffe's Reshape sizes the tops by the selected count, 0 included: empty tops. (Caffe's
    # own backward then divides by that 0 count; the gradient here is zero.)
    net = Net(parse_net(filter_net([(3, 2, 2), (3,)])))
    x = torch.randn(3, 2, 2, requires_grad=True)
    top = net(b0=x, sel=torch.zeros(3))["f0"]
    assert tuple(top.shape) == (0, 2, 2)
    assert net.blob_shapes["f0"] == (3, 2, 2)  # still the upper bound
    (top.sum() + x.sum() * 0).backward()
    assert torch.equal(x.grad, torch.zeros(3, 2, 2))


def test_filter_refuses_backward_to_the_selector():
    net = Net(parse_net(filter_net([(3, 2), (3,)])))
    sel = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    top = net(b0=torch.randn(3, 2, requires_grad=True), sel=sel)["f0"]
    with pytest.raises(CaffeAlexError, match="layer 'filter' \\(Filter\\): cannot backpropagate"):
        top.sum().backward()
    # propagate_down: false for the selector is Caffe's way out
    net = Net(parse_net(filter_net([(3, 2), (3,)], "propagate_down: true propagate_down: false")))
    x = torch.randn(3, 2, requires_grad=True)
    net(b0=x, sel=sel)["f0"].sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 1], [0, 0], [1, 1]]))
    assert sel.grad is None


def test_filter_gradcheck():
    gradcheck_net(
        filter_net([(4, 3), (4, 2, 2), (4, 1)]),
        inputs={"sel": torch.tensor([[1.0], [0.0], [3.0], [1.0]])},
        check_inputs=["b0", "b1"],
    )


@pytest.mark.parametrize(
    "shapes,tops,message",
    [
        ([(4, 3), (4,)], 2, "needs one top per filtered bottom: 1 bottoms to filter"),
        ([(4, 3), (4, 2)], 1, r"the selector \(last bottom\) must have shape \(N,\) or \(N, 1"),
        ([(4, 3), (5, 1)], 1, r"bottom 0 has shape \[4, 3\]: its first dimension must be the "),
        ([(4, 3), (4, 1), (4, 1, 1)], 1, "needs one top per filtered bottom"),
    ],
)
def test_filter_setup_errors(shapes, tops, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(filter_net(shapes, n_tops=tops)))
    assert "layer 'filter' (Filter)" in str(info.value)


def test_filter_checks_shapes_again_on_reshape():
    net = Net(parse_net(filter_net([(4, 3), (4,)])))
    with pytest.raises(CaffeAlexError, match="first dimension must be the selector's"):
        net(b0=torch.randn(5, 3), sel=torch.ones(4))


# -- BatchReindex -----------------------------------------------------------------------------
def caffe_reindex(data, idx, dy=None):
    """BatchReindexLayer: out[n] = in[int(permut[n])]; backward zeroes the bottom diff and adds
    each top item's diff into its source item."""
    inner = data[0].size
    flat = data.reshape(data.shape[0], inner)
    out = np.stack([flat[int(v)] for v in idx]) if len(idx) else flat[:0]
    out = out.reshape(len(idx), *data.shape[1:])
    if dy is None:
        return out, None
    grad = np.zeros_like(flat)
    d = dy.reshape(len(idx), inner)
    for n, v in enumerate(idx):
        grad[int(v)] += d[n]
    return out, grad.reshape(data.shape)


@pytest.mark.parametrize(
    "data_shape,idx",
    [
        ((5, 3, 2), [4, 0, 3, 3, 1, 0, 3]),  # repeated indices add up in backward
        ((3, 4), [2.7, 0.2, 1.0]),  # non-integers truncate, as static_cast<int>
        ((4,), [3, 2, 1, 0]),
        ((2, 2, 2, 2), [1]),
    ],
)
def test_reindex_matches_caffe(data_shape, idx):
    rng = np.random.default_rng(2)
    data = rng.standard_normal(data_shape).astype(np.float32)
    idx = np.array(idx, np.float32)
    net = Net(parse_net(reindex_net(data_shape, len(idx))))
    assert net.blob_shapes["out"] == (len(idx), *data_shape[1:])
    x = torch.from_numpy(data).requires_grad_()
    y = net(data=x, idx=torch.from_numpy(idx))["out"]
    ref, _ = caffe_reindex(data, idx)
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(x.grad.numpy(), caffe_reindex(data, idx, dy)[1], rtol=1e-6)


@pytest.mark.parametrize(
    "idx,bad,position",
    [
        ([0, 3, 1], "3", 1),
        ([-1, 0, 1], "-1", 0),
        ([0, 1, -0.5], "-0.5", 2),
        ([0, np.nan, 1], "nan", 1),
    ],
)
def test_reindex_refuses_indices_out_of_range(idx, bad, position):
    net = Net(parse_net(reindex_net((3, 2), 3)))
    with pytest.raises(CaffeAlexError) as info:
        net(data=torch.randn(3, 2), idx=torch.tensor(idx, dtype=torch.float32))
    message = str(info.value)
    assert message.startswith("layer 'reindex' (BatchReindex): ")
    assert f"index {bad} (position {position}) is out of range for a batch of 3" in message


def test_reindex_refuses_backward_to_the_indices():
    net = Net(parse_net(reindex_net((3, 2), 2)))
    idx = torch.tensor([2.0, 0.0], requires_grad=True)
    y = net(data=torch.randn(3, 2, requires_grad=True), idx=idx)["out"]
    with pytest.raises(CaffeAlexError, match="layer 'reindex' .*backpropagate to the indices"):
        y.sum().backward()
    net = Net(parse_net(reindex_net((3, 2), 2, "propagate_down: true propagate_down: false")))
    x = torch.randn(3, 2, requires_grad=True)
    net(data=x, idx=idx)["out"].sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 1], [0, 0], [1, 1]]))


def test_reindex_gradcheck():
    gradcheck_net(
        reindex_net((4, 3), 6),
        inputs={"idx": torch.tensor([3.0, 0.0, 3.0, 1.0, 3.0, 0.0])},
        check_inputs=["data"],
    )


def test_reindex_setup_errors():
    text = f"""name: "r"
layer {{ name: "in" type: "Input" top: "data" top: "idx"
  input_param {{ shape {{ {dims((3, 2))} }} shape {{ dim: 2 dim: 1 }} }} }}
layer {{ name: "reindex" type: "BatchReindex" bottom: "data" bottom: "idx" top: "out" }}
"""
    with pytest.raises(CaffeAlexError, match=r"the indices \(bottom 1\) must be 1-D, got shape"):
        Net(parse_net(text))
    one = reindex_net((3, 2), 2).replace('bottom: "idx" ', "")
    with pytest.raises(CaffeAlexError, match="layer 'reindex'.*takes 2 bottom blob"):
        Net(parse_net(one))
