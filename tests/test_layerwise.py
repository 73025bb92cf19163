"""layerwise.py: Caffe's execution of a net over persistent blobs (pycaffe's Net, its solvers,
``caffe-alex time``), against float64 autograd of the same layers and Caffe's rules.

The registry test builds every registered layer type that has a backward in a small net
(Input layers for its bottoms, force_backward), writes its bottoms' data and its tops' diffs by
hand and runs ``backward(start=L, end=L)`` with no forward before it: the bottoms' and
parameters' diffs must equal float64 autograd of the layer at that data. A new type needs a
row in CONFIGS or in EXCLUDED (with the reason).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import caffe
from caffe_alex.layers import layer_types
from caffe_alex.layerwise import BackwardNeeds, BlobExecutor
from caffe_alex.net import Net
from tests.reference import parse_net

# fmt: off
EXCLUDED = {
    # data layers: their tops come from outside, nothing flows back into them
    **dict.fromkeys(["AnnotatedData", "Data", "DenseImageData", "DummyData", "HDF5Data",
                     "ImageData", "ImageSegData", "Input", "MemoryData", "WindowData"],
                    "data layer"),  # fmt: skip
    # Caffe's Backward of these is empty or NOT_IMPLEMENTED: no diff to compare
    **dict.fromkeys(["Accuracy", "ArgMax", "DetectionOutput", "PriorBox", "Proposal",
                     "SegAccuracy", "Threshold", "HDF5Output"],
                    "no backward in Caffe"),  # fmt: skip
    "Silence": "no top: Caffe's backward zeroes its bottoms' diffs (not written here)",
    "Python": "the user's own backward: BVLC's test_python_layer runs it (test_bvlc_suite)",
}
# fmt: on


def _ints(high):
    return lambda rng, shape: rng.integers(0, high, shape).astype(np.float64)


def _positive(rng, shape):
    return rng.uniform(0.2, 1.0, shape)


def _unit(rng, shape):
    return rng.uniform(0.0, 1.0, shape)


def _rois(rng, shape):  # (n, 5): image 0, x1 y1 x2 y2 inside a 8 x 8 map
    boxes = np.sort(rng.uniform(0, 7, (shape[0], 2, 2)), axis=1).reshape(shape[0], 4)
    return np.concatenate([np.zeros((shape[0], 1)), boxes[:, [0, 2, 1, 3]]], axis=1)


def _cont(rng, shape):  # sequence markers: a sequence starts at t = 0
    out = np.ones(shape)
    out[0] = 0
    return out


def _mask(rng, shape):  # max-unpooling mask: a distinct position of the 2x-wide map per input
    n, c, h, w = shape
    index = np.arange(h * w).reshape(h, w)
    positions = (index // w) * 2 * (2 * w) + (index % w) * 2  # top-left of each 2x2 window
    return np.broadcast_to(positions, shape).astype(np.float64)


def _priors(rng, shape):
    P = shape[2] // 4
    boxes = np.sort(rng.uniform(0, 1, (P, 2, 2)), axis=1).reshape(P, 4)[:, [0, 2, 1, 3]]
    var = np.tile([0.1, 0.1, 0.2, 0.2], P)
    return np.concatenate([boxes.ravel(), var]).reshape(shape)


def _gt(rng, shape):  # one box of label 1 in image 0
    return np.array([0, 1, 0, 0.1, 0.1, 0.6, 0.6, 0], np.float64).reshape(shape)


# fmt: off
GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
# type -> (bottom shapes, [value makers per bottom or None: normal], layer fields, top count,
# phase)
CONFIGS = {
    "AbsVal": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "Axpy": ([(2, 3, 1, 1), (2, 3, 4, 4), (2, 3, 4, 4)], None, "", 1, "TRAIN"),
    "BN": ([(2, 3, 4, 4)], None, "", 1, "TRAIN"),
    "BNLL": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "BatchNorm": ([(2, 3, 4, 4)], None, "", 1, "TRAIN"),
    "BatchReindex": ([(4, 3), (5,)], [None, _ints(4)], "", 1, "TRAIN"),
    "Bias": ([(2, 3, 4)], None, "bias_param { filler { type: 'gaussian' } }", 1, "TRAIN"),
    "Clip": ([(2, 3, 4)], None, "clip_param { min: -0.5 max: 0.5 }", 1, "TRAIN"),
    "Concat": ([(2, 3, 4), (2, 2, 4)], None, "", 1, "TRAIN"),
    "ContrastiveLoss": ([(4, 3, 1, 1), (4, 3, 1, 1), (4, 1, 1, 1)], [None, None, _ints(2)], "",
                        1, "TRAIN"),  # fmt: skip
    "Convolution": ([(2, 3, 6, 6)], None, "convolution_param { num_output: 4 kernel_size: 3 "
                    f"stride: 2 pad: 1 {GAUSS} }}", 1, "TRAIN"),
    "ConvolutionDepthwise": ([(2, 3, 6, 6)], None, "convolution_param { num_output: 3 "
                             "kernel_size: 3 weight_filler { type: 'gaussian' } }", 1, "TRAIN"),
    "Crop": ([(2, 3, 6, 6), (2, 3, 4, 4)], None, "crop_param { axis: 2 offset: 1 }", 1, "TRAIN"),
    "Deconvolution": ([(2, 3, 4, 4)], None,
                      f"convolution_param {{ num_output: 2 kernel_size: 3 stride: 2 {GAUSS} }}",
                      1, "TRAIN"),  # fmt: skip
    "DepthwiseConvolution": ([(2, 3, 6, 6)], None, "convolution_param { num_output: 3 group: 3 "
                             "kernel_size: 3 weight_filler { type: 'gaussian' } }", 1, "TRAIN"),
    "Dropout": ([(2, 3, 4)], None, "", 1, "TEST"),  # TRAIN's mask: test_dropout_keeps_its_mask
    "ELU": ([(2, 3, 4)], None, "elu_param { alpha: 0.5 }", 1, "TRAIN"),
    "Eltwise": ([(2, 3, 4), (2, 3, 4)], None, "eltwise_param { operation: PROD }", 1, "TRAIN"),
    "Embed": ([(4,)], [_ints(10)], "embed_param { num_output: 3 input_dim: 10 "
              "weight_filler { type: 'gaussian' } }", 1, "TRAIN"),
    "EuclideanLoss": ([(4, 3), (4, 3)], None, "", 1, "TRAIN"),
    "Exp": ([(2, 3, 4)], None, "exp_param { scale: 0.5 shift: 0.1 }", 1, "TRAIN"),
    "Filter": ([(4, 3), (4,)], [None, lambda rng, s: np.array([1.0, 0, 1, 1])], "", 1, "TRAIN"),
    "Flatten": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "HingeLoss": ([(4, 5), (4,)], [None, _ints(5)], "", 1, "TRAIN"),
    "Im2col": ([(2, 3, 5, 5)], None, "convolution_param { kernel_size: 3 }", 1, "TRAIN"),
    "InfogainLoss": ([(4, 5), (4,), (5, 5)], [_positive, _ints(5), _unit], "", 1, "TRAIN"),
    "InnerProduct": ([(2, 3, 2, 2)], None, f"inner_product_param {{ num_output: 4 {GAUSS} }}",
                     1, "TRAIN"),  # fmt: skip
    "Interp": ([(2, 3, 4, 4)], None, "interp_param { zoom_factor: 2 }", 1, "TRAIN"),
    "LRN": ([(2, 5, 4, 4)], None, "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }", 1,
            "TRAIN"),  # fmt: skip
    "LSTM": ([(3, 2, 4), (3, 2)], [None, _cont], "recurrent_param { num_output: 3 "
             "weight_filler { type: 'gaussian' std: 0.5 } }", 1, "TRAIN"),
    "LSTMUnit": ([(1, 2, 3), (1, 2, 12), (1, 2)], [None, None, _ints(2)], "", 2, "TRAIN"),
    "Log": ([(2, 3, 4)], [_positive], "log_param { scale: 2 shift: 0.1 }", 1, "TRAIN"),
    "MVN": ([(2, 3, 4, 4)], None, "", 1, "TRAIN"),
    "MultiBoxLoss": ([(1, 24), (1, 18), (1, 2, 24), (1, 1, 1, 8)], [None, None, _priors, _gt],
                     "multibox_loss_param { num_classes: 3 }", 1, "TRAIN"),  # fmt: skip
    "MultinomialLogisticLoss": ([(4, 5), (4,)], [_positive, _ints(5)], "", 1, "TRAIN"),
    "Normalize": ([(2, 3, 4, 4)], None, "norm_param { scale_filler { type: 'constant' "
                  "value: 2 } }", 1, "TRAIN"),
    "PReLU": ([(2, 3, 4, 4)], None, "prelu_param { filler { type: 'gaussian' } }", 1, "TRAIN"),
    "PSROIPooling": ([(1, 8, 8, 8), (3, 5)], [None, _rois],
                     "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 }", 1,
                     "TRAIN"),  # fmt: skip
    "Parameter": ([], None, "parameter_param { shape { dim: 2 dim: 3 } }", 1, "TRAIN"),
    "Permute": ([(2, 3, 4, 5)], None, "permute_param { order: 0 order: 2 order: 3 order: 1 }",
                1, "TRAIN"),  # fmt: skip
    "Pooling": ([(2, 3, 6, 6)], None, "pooling_param { pool: MAX kernel_size: 3 stride: 2 }",
                1, "TRAIN"),  # fmt: skip
    "Power": ([(2, 3, 4)], [_positive], "power_param { power: 1.5 scale: 0.5 shift: 0.2 }", 1,
              "TRAIN"),  # fmt: skip
    "RNN": ([(3, 2, 4), (3, 2)], [None, _cont], "recurrent_param { num_output: 3 "
            "weight_filler { type: 'gaussian' std: 0.5 } }", 1, "TRAIN"),
    "ROIPooling": ([(1, 3, 8, 8), (2, 5)], [None, _rois],
                   "roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 }", 1, "TRAIN"),
    "ReLU": ([(2, 3, 4)], None, "relu_param { negative_slope: 0.1 }", 1, "TRAIN"),
    "ReLU6": ([(2, 3, 4)], [lambda rng, s: rng.normal(3, 4, s)], "", 1, "TRAIN"),
    "Reduction": ([(2, 3, 4)], None, "reduction_param { operation: SUMSQ axis: 1 }", 1, "TRAIN"),
    "Region": ([(1, 14, 3, 3)], None, "region_param { classes: 2 coords: 4 "
               "boxes_of_each_grid: 2 softmax: true }", 1, "TRAIN"),
    "Reorg": ([(1, 4, 4, 4)], None, "reorg_param { stride: 2 }", 1, "TRAIN"),
    "Reshape": ([(2, 3, 4)], None, "reshape_param { shape { dim: 0 dim: -1 } }", 1, "TRAIN"),
    "SPP": ([(2, 3, 6, 6)], None, "spp_param { pyramid_height: 2 }", 1, "TRAIN"),
    "Scale": ([(2, 3, 4, 4)], None, "scale_param { bias_term: true filler { type: 'gaussian' } "
              "bias_filler { type: 'gaussian' } }", 1, "TRAIN"),
    "ShuffleChannel": ([(2, 4, 3, 3)], None, "shuffle_channel_param { group: 2 }", 1, "TRAIN"),
    "Sigmoid": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "SigmoidCrossEntropyLoss": ([(4, 3), (4, 3)], [None, _ints(2)], "", 1, "TRAIN"),
    "Slice": ([(2, 6, 3)], None, "slice_param { axis: 1 slice_point: 2 }", 2, "TRAIN"),
    "SmoothL1Loss": ([(2, 4, 3, 3), (2, 4, 3, 3)], None, "", 1, "TRAIN"),
    "Softmax": ([(4, 5)], None, "", 1, "TRAIN"),
    "SoftmaxWithLoss": ([(4, 5), (4,)], [None, _ints(5)], "", 1, "TRAIN"),
    "Split": ([(2, 3)], None, "", 2, "TRAIN"),
    "Swish": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "TanH": ([(2, 3, 4)], None, "", 1, "TRAIN"),
    "Tile": ([(2, 3)], None, "tile_param { axis: 1 tiles: 2 }", 1, "TRAIN"),
    "Upsample": ([(1, 2, 3, 3), (1, 2, 3, 3)], [None, _mask], "upsample_param { scale: 2 }", 1,
                 "TRAIN"),  # fmt: skip
}
# fmt: on


# Caffe refuses a diff for these bottoms (indices, a selector: CHECK(!propagate_down[i]));
# Filter's top shape comes from its selector's values, so it needs a forward first
NO_DIFF = {"BatchReindex": {1}, "Embed": {0}, "Filter": {1}}
FORWARD_FIRST = {"Filter"}


def test_every_registered_type_is_configured_or_excluded():
    types = set(layer_types())
    missing = types - set(CONFIGS) - set(EXCLUDED)
    assert not missing, f"add a CONFIGS row (or an EXCLUDED reason) for {sorted(missing)}"
    assert not (set(CONFIGS) | set(EXCLUDED)) - types, "rows for types no longer registered"
    assert not set(CONFIGS) & set(EXCLUDED)


def _net_text(kind: str) -> str:
    shapes, _, fields, tops, _ = CONFIGS[kind]
    text = "force_backward: true\n"
    for i, shape in enumerate(shapes):
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "in{i}" type: "Input" top: "b{i}" '
                 f"input_param {{ shape {{ {dims} }} }} }}\n")  # fmt: skip
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    names = " ".join(f'top: "t{i}"' for i in range(tops))
    return text + f'layer {{ name: "L" type: "{kind}" {bottoms} {names} {fields} }}\n'


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_backward_through_blobs_equals_float64_autograd(kind, tmp_path):
    shapes, makers, _, tops, phase = CONFIGS[kind]
    path = tmp_path / "net.prototxt"
    path.write_text(_net_text(kind))
    net = caffe.Net(str(path), getattr(caffe, phase))
    rng = np.random.default_rng(sum(map(ord, kind)))
    makers = makers or [None] * len(shapes)
    xs = [(m or (lambda r, s: r.normal(size=s)))(rng, s) for m, s in zip(makers, shapes)]
    for i, x in enumerate(xs):
        net.blobs[f"b{i}"].data[...] = x
    for blob in net.params.get("L", []):  # learnable values where the filler left constants
        blob.data[...] += rng.normal(scale=0.1, size=blob.data.shape)
    position = net._layer_names.index("L")
    needs = net._executor.needs.bottom[position]
    for j in NO_DIFF.get(kind, ()):
        needs[j] = False
    if kind in FORWARD_FIRST:
        net.forward(start="L", end="L")
    gs = [rng.normal(size=net.blobs[f"t{i}"].data.shape) for i in range(tops)]
    for i, g in enumerate(gs):
        net.blobs[f"t{i}"].diff[...] = g
    layer = net.module.layer("L")
    reference = copy.deepcopy(layer).double()
    params = list(reference.blobs)
    for p in params:
        p.grad = None
    net.backward(start="L", end="L")  # no forward before it: Caffe computes from the blobs

    # float64 autograd of the same layer at the same (float32) data
    inputs = [torch.tensor(x.astype(np.float32), dtype=torch.float64) for x in xs]
    for t, need in zip(inputs, needs):
        t.requires_grad_(need)
    with torch.enable_grad():
        out = reference(*inputs)
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    pairs = [(o, torch.tensor(g.astype(np.float32), dtype=torch.float64))
             for o, g in zip(out, gs) if o.requires_grad]  # fmt: skip
    assert pairs, f"{kind}: no top has a gradient: list it in EXCLUDED"
    wanted = [t for t in inputs if t.requires_grad] + [p for p in params if p.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                allow_unused=True)  # fmt: skip
    got = [net.blobs[f"b{i}"].diff for i, t in enumerate(inputs) if t.requires_grad]
    got += [b.diff for b, p in zip(net.params.get("L", []), params) if p.requires_grad]
    assert got, kind
    for mine, ref in zip(got, grads):
        ref = np.zeros(mine.shape) if ref is None else ref.numpy()
        scale = max(np.abs(ref).max(), 1e-6)
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-4 * scale, err_msg=kind)


# -- what a forward leaves, and what changes it ---------------------------------------------
CHAIN = """force_backward: true
layer { name: "in" type: "Input" top: "x" top: "x2"
        input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } shape { dim: 4 dim: 4 dim: 3 dim: 3 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "scale" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "drop" type: "Dropout" bottom: "c" top: "d" dropout_param { dropout_ratio: 0.5 } }
layer { name: "sig" type: "Sigmoid" bottom: "d" top: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "x2" top: "loss" }
"""  # noqa: E501


def _chain(tmp_path):
    path = tmp_path / "chain.prototxt"
    path.write_text(CHAIN)
    return caffe.Net(str(path), caffe.TRAIN)


def _graph_gradients(net, x, x2):
    """The module (one autograd graph) on the same weights, with Dropout's mask of ``net``'s
    last forward (its top over its bottom, where nonzero)."""
    module = Net(net.module.net_param, "TRAIN")
    module.load_state_dict(net.module.state_dict())
    drop = net.blobs["d"].data / np.where(net.blobs["c"].data == 0, 1, net.blobs["c"].data)
    module.layers["drop"].forward = lambda c: c * torch.from_numpy(drop.astype(np.float32))
    xt = torch.from_numpy(x).requires_grad_()
    module(x=xt, x2=torch.from_numpy(x2))
    module.loss.backward()
    return xt.grad.numpy(), {n: [p.grad for p in ps] for n, ps in module.params.items()}


def test_forward_backward_equals_one_graph_with_in_place_layers_and_dropout(tmp_path):
    net = _chain(tmp_path)
    rng = np.random.default_rng(0)
    x, x2 = rng.normal(size=(4, 3, 5, 5)).astype(np.float32), rng.uniform(size=(4, 4, 3, 3))
    held = net.blobs["c"].data  # Python holds the in-place blob's memory: copies go into it
    net.forward(x=x, x2=x2.astype(np.float32))
    assert np.shares_memory(held, net.blobs["c"].data)
    net.backward()
    gx, gparams = _graph_gradients(net, x, x2.astype(np.float32))
    np.testing.assert_allclose(net.blobs["x"].diff, gx, rtol=1e-4, atol=1e-6)
    for name in ("conv", "scale"):
        for mine, ref in zip(net.params[name], gparams[name]):
            np.testing.assert_allclose(mine.diff, ref.numpy(), rtol=1e-4, atol=1e-6)


def test_dropout_keeps_its_mask_and_batch_norm_its_averages_when_backward_recomputes(tmp_path):
    net = _chain(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    net.forward(x=x, x2=np.zeros((4, 4, 3, 3), np.float32))
    kept = net.blobs["d"].data != 0  # Dropout's mask where ReLU left a nonzero value
    alive = net.blobs["c"].data != 0
    averages = [b.data.copy() for b in net.params["bn"]]
    net.blobs["c"].data[...] *= 2  # changed by hand: Dropout's backward runs its forward again
    net.blobs["d"].diff[...] = 1
    net.backward(start="drop", end="drop")
    assert ((net.blobs["c"].diff != 0) == kept)[alive].all()  # the last forward's mask
    net.backward(start="bn", end="bn")  # BatchNorm's forward again: averages not moved
    for before, after in zip(averages, net.params["bn"]):
        np.testing.assert_array_equal(before, after.data)


def test_backward_reads_the_data_blobs_hold_now(tmp_path):
    """A bottom written by hand between forward and backward is what backward reads (an
    InnerProduct's weight diff is top diff x bottom data); a layer whose blobs are untouched
    reuses its forward's graph (no forward runs again)."""
    text = """force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
"""
    path = tmp_path / "ip.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), caffe.TEST)
    calls = {"ip1": 0, "ip2": 0}
    for name in calls:
        count = lambda module, args, out, name=name: calls.update({name: calls[name] + 1})  # noqa: E731
        net.module.layer(name).register_forward_hook(count)
    net.forward(x=np.ones((2, 3), np.float32))
    g = np.arange(4, dtype=np.float32).reshape(2, 2)
    net.blobs["y"].diff[...] = g
    net.backward()
    assert calls == {"ip1": 1, "ip2": 1}  # both graphs reused
    h = np.full((2, 4), 3.0, np.float32)
    net.blobs["h"].data[...] = h
    net.clear_param_diffs()
    net.backward(start="ip2", end="ip2")
    np.testing.assert_allclose(net.params["ip2"][0].diff, g.T @ h, rtol=1e-6)
    assert calls == {"ip1": 1, "ip2": 2}  # ip2 read h again


def test_a_blob_read_twice_without_split_layers_sums_its_readers_diffs():
    text = """force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "Power" bottom: "x" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "x" top: "b" power_param { scale: 3 } }
"""
    ex = BlobExecutor(Net(parse_net(text), "TEST"))  # built without Caffe's Split layers
    ex.blobs["a"].diff_tensor().fill_(1)
    ex.blobs["b"].diff_tensor().fill_(1)
    ex.backward()
    assert (ex.blobs["x"].diff == 5).all()


def test_backward_needs_follow_caffes_net_init():
    text = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "fixed" type: "InnerProduct" bottom: "data" top: "f" param { lr_mult: 0 }
        param { lr_mult: 0 } inner_product_param { num_output: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "f" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "side" type: "InnerProduct" bottom: "f" top: "side" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""  # noqa: E501
    net = Net(parse_net(text), "TRAIN")
    needs = BackwardNeeds(net)
    by_name = dict(zip(net.layer_names, zip(needs.layer, needs.bottom)))
    assert by_name["fixed"] == (False, [False])  # lr_mult 0 and an input below: nothing to do
    assert by_name["ip"] == (True, [False])  # learns; its bottom leads to no learning layer
    assert by_name["side"] == (False, [False])  # leads to no loss
    assert by_name["loss"] == (True, [True, False])
    forced = Net(parse_net("force_backward: true\n" + text), "TRAIN")
    needs = BackwardNeeds(forced)
    by_name = dict(zip(forced.layer_names, zip(needs.layer, needs.bottom)))
    assert by_name["fixed"] == (True, [True]) and by_name["side"] == (True, [True])
    assert by_name["loss"] == (True, [True, False])  # never the labels (AllowForceBackward)


def test_a_solver_trains_alike_as_one_graph_and_layer_by_layer():
    """The Solver's two engines (engines.py) on a net fed through Input layers: the same
    weights after the same iterations, bit for bit."""
    import itertools

    from caffe_alex.proto import caffe_pb2
    from caffe_alex.solvers import Solver

    text = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 1 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
    gen = torch.Generator().manual_seed(0)
    batch = {"data": torch.randn(4, 1, 6, 6, generator=gen), "label": torch.tensor([0.0, 1, 4, 2])}
    solvers = []
    for layerwise in (False, True):
        param = caffe_pb2.SolverParameter(base_lr=0.1, momentum=0.9, lr_policy="fixed",
                                          random_seed=1)  # fmt: skip
        param.net_param.CopyFrom(parse_net(text))
        feeds = {"train": itertools.repeat(batch), "test": []}
        solvers.append(Solver(param, layerwise=layerwise, feeds=feeds))
        solvers[-1].step(3)
    for (_, a), (_, b) in zip(*(s.train_net.params.items() for s in solvers)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
