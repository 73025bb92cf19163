"""The generic builder: wiring, in-place rebinding, gradient summing, loss weights, sharing,
reshape, phase filtering and the errors that point at the prototxt."""

from __future__ import annotations

import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, parse_net

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'


def ip(name, bottom, n=4, extra=""):
    return (
        f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" {extra}'
        f' inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" }} }} }}\n'
    )


def build(text, phase="TEST", **kw):
    return Net(parse_net(text), phase, **kw)


def test_in_place_layer_rebinds_the_blob_name():
    net = build(
        INPUT + ip("fc", "data") + 'layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }'
    )
    x = torch.randn(2, 3)
    out = net(x)
    assert list(out) == ["fc"]
    pre = x @ net.params["fc"][0].T + net.params["fc"][1]
    torch.testing.assert_close(out["fc"], pre.clamp_min(0))
    assert net.blob_shapes["fc"] == (2, 4)


def test_blob_read_by_two_layers_sums_gradients():
    text = INPUT + (
        'layer { name: "a" type: "Power" bottom: "data" top: "a" power_param { scale: 2 } }\n'
        'layer { name: "b" type: "Power" bottom: "data" top: "b" power_param { scale: 3 } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }\n'
    )
    net = build(text)
    x = torch.randn(2, 3, requires_grad=True)
    net(x)["sum"].sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3), 5.0))


def test_loss_weights_default_and_explicit():
    text = INPUT.replace('top: "data"', 'top: "data" top: "target"').replace(
        "shape { dim: 2 dim: 3 }", "shape { dim: 2 dim: 3 }"
    ) + (
        'layer { name: "l2" type: "EuclideanLoss" bottom: "data" bottom: "target" top: "l2" }\n'
        'layer { name: "sq" type: "Power" bottom: "data" top: "sq" loss_weight: 0.5 '
        "power_param { power: 2 } }\n"
        'layer { name: "half" type: "EuclideanLoss" bottom: "data" bottom: "target" top: "half" '
        "loss_weight: 0.25 }\n"
    )
    net = build(text)
    x, t = torch.randn(2, 3), torch.randn(2, 3)
    net(data=x, target=t)
    l2 = ((x - t) ** 2).sum() / 4
    expected = l2 + 0.5 * (x**2).sum() + 0.25 * l2
    torch.testing.assert_close(net.loss, expected)


def test_no_loss_without_weights():
    net = build(INPUT + ip("fc", "data"))
    net(torch.randn(2, 3))
    assert net.loss is None


def test_parameter_sharing_by_name():
    share = 'param { name: "w" lr_mult: 3 } param { name: "b" }'
    net = build(INPUT + ip("fc1", "data", 3, share) + ip("fc2", "fc1", 3, share))
    assert net.params["fc1"][0] is net.params["fc2"][0]
    assert net.params["fc1"][1] is net.params["fc2"][1]
    learnable = net.learnable_params()
    assert [(p.layer, p.index, p.lr_mult) for p in learnable] == [("fc1", 0, 3.0), ("fc1", 1, 1.0)]
    assert len(list(net.parameters())) == 2


def test_sharing_shape_mismatch_is_an_error():
    share = 'param { name: "w" }'
    with pytest.raises(
        CaffeAlexError,
        match=r"shared parameter 'w' \(blob 0\) has shape \[5, 4\], "
        r"but owner layer 'fc1' has \[4, 3\]",
    ):
        build(INPUT + ip("fc1", "data", 4, share) + ip("fc2", "fc1", 5, share))


def test_lr_and_decay_mult_recorded():
    net = build(
        INPUT
        + ip(
            "fc", "data", 4, "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"
        )
    )
    assert [(p.lr_mult, p.decay_mult) for p in net.learnable_params()] == [(1.0, 1.0), (2.0, 0.0)]


def test_reshape_on_new_input_shape():
    net = build(INPUT + ip("fc", "data"))
    out = net(torch.randn(7, 3))
    assert out["fc"].shape == (7, 4)
    assert net.blob_shapes["data"] == (7, 3) and net.blob_shapes["fc"] == (7, 4)
    with pytest.raises(CaffeAlexError, match=r"layer 'fc' \(InnerProduct\)"):
        net(torch.randn(7, 5))


def test_phase_filtering_with_stages_and_levels():
    text = INPUT + (
        ip("train_only", "data", 2, "include { phase: TRAIN }")
        + ip("test_only", "data", 2, "include { phase: TEST }")
        + ip("staged", "data", 2, 'include { stage: "deploy" }')
        + ip("not_deep", "data", 2, "exclude { min_level: 2 }")
    )
    assert build(text, "TRAIN").layer_names == ["data", "train_only", "not_deep"]
    assert build(text, "TEST").layer_names == ["data", "test_only", "not_deep"]
    assert build(text, "TEST", stages=["deploy"], level=3).layer_names == [
        "data",
        "test_only",
        "staged",
    ]


def test_propagate_down_false_stops_the_gradient():
    text = INPUT + (
        'layer { name: "a" type: "Power" bottom: "data" top: "a" propagate_down: false }\n'
    )
    net = build(text)
    x = torch.randn(2, 3, requires_grad=True)
    assert not net(x)["a"].requires_grad


def test_outputs_are_unconsumed_blobs_sorted_like_caffe():
    text = INPUT + ip("zeta", "data") + ip("alpha", "data")
    assert build(text).output_names == ["alpha", "zeta"]


def test_input_binding_errors():
    net = build(INPUT)
    with pytest.raises(CaffeAlexError, match=r"missing net input\(s\) \['data'\]"):
        net()
    with pytest.raises(CaffeAlexError, match="'label' is not an input of the net"):
        net(torch.zeros(2, 3), label=torch.zeros(2))


def test_layer_names_with_dots_are_kept():
    net = build(INPUT + ip("conv1.1", "data"))
    assert list(net.params) == ["conv1.1"]
    assert "conv1_1" in dict(net.named_children())["layers"]._modules


def test_embedded_blobs_are_loaded():
    text = INPUT + (
        'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        "inner_product_param { num_output: 1 } "
        "blobs { shape { dim: 1 dim: 3 } data: 1 data: 2 data: 3 } "
        "blobs { shape { dim: 1 } data: 0.5 } }"
    )
    out = build(text)(torch.ones(2, 3))["fc"]
    torch.testing.assert_close(out, torch.full((2, 1), 6.5))


def test_data_layers_are_net_inputs_with_declared_shapes():
    text = (
        'layer { name: "d" type: "MemoryData" top: "data" top: "label" '
        "memory_data_param { batch_size: 4 channels: 3 height: 8 width: 9 } }\n" + ip("fc", "data")
    )
    net = build(text)
    assert net.input_names == ["data", "label"]
    assert net.blob_shapes["data"] == (4, 3, 8, 9) and net.blob_shapes["label"] == (4,)


def test_input_shapes_override_for_sources():
    text = (
        'layer { name: "d" type: "Data" top: "data" top: "label" '
        'data_param { source: "/nonexistent/lmdb" batch_size: 4 backend: LMDB } }\n'
        + ip("fc", "data")
    )
    net = build(text, input_shapes={"data": (4, 1, 28, 28), "label": (4,)})
    assert net.blob_shapes["fc"] == (4, 4)


def test_loss_layer_without_top_gets_an_anonymous_one():
    text = INPUT.replace('top: "data"', 'top: "data" top: "target"') + (
        'layer { name: "l2" type: "EuclideanLoss" bottom: "data" bottom: "target" }\n'
    )
    net = build(text)
    x, t = torch.randn(2, 3), torch.randn(2, 3)
    assert net(data=x, target=t) == {}
    torch.testing.assert_close(net.loss, ((x - t) ** 2).sum() / 4)


CHAIN = INPUT + ip("fc", "data") + 'layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }\n'


def _gradients(net, x):
    out = net(x)
    sum(o.sum() for o in out.values()).backward()
    return out, [p.grad.clone() for p in net.parameters()]


def test_in_place_relu_overwrites_its_bottom_only_where_safe():
    assert build(CHAIN).layer("relu").in_place  # InnerProduct keeps nothing of its output
    # another layer read "fc" before the ReLU: the old values must survive
    read_first = (
        INPUT
        + ip("fc", "data")
        + (
            'layer { name: "copy" type: "Power" bottom: "fc" top: "copy" }\n'
            'layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }\n'
        )
    )
    assert not build(read_first).layer("relu").in_place
    # Sigmoid's backward reads its output: no overwrite
    after_sigmoid = INPUT + (
        'layer { name: "sig" type: "Sigmoid" bottom: "data" top: "s" }\n'
        'layer { name: "relu" type: "ReLU" bottom: "s" top: "s" }\n'
    )
    assert not build(after_sigmoid).layer("relu").in_place
    # not declared in place, or fed by a net input: no overwrite
    assert (
        not build(INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }')
        .layer("r")
        .in_place
    )


def test_in_place_relu_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    net = build(CHAIN)
    x = torch.randn(2, 3)
    out, grads = _gradients(net, x)
    net.layer("relu").in_place = False
    net.zero_grad()
    out_copy, grads_copy = _gradients(net, x)
    torch.testing.assert_close(out["fc"], out_copy["fc"])
    for a, b in zip(grads, grads_copy, strict=True):
        torch.testing.assert_close(a, b)


def test_earlier_reader_keeps_pre_relu_values():
    text = (
        INPUT
        + ip("fc", "data")
        + (
            'layer { name: "copy" type: "Power" bottom: "fc" top: "copy" }\n'
            'layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }\n'
        )
    )
    net = build(text)
    out = net(torch.randn(4, 3))
    assert (out["copy"] < 0).any() and (out["fc"] >= 0).all()


def test_shared_multipliers_follow_caffe():
    # the sharer may set what the owner left unset; a conflicting value is an error
    net = build(
        INPUT
        + ip("fc1", "data", 3, 'param { name: "w" }')
        + ip("fc2", "fc1", 3, 'param { name: "w" lr_mult: 5 decay_mult: 0 }')
    )
    owner = net.learnable_params()[0]
    assert (owner.layer, owner.lr_mult, owner.decay_mult) == ("fc1", 5.0, 0.0)
    with pytest.raises(
        CaffeAlexError,
        match="shared parameter 'w' has mismatched lr_mult: 2.0 here, 3.0 in layer 'fc1'",
    ):
        build(
            INPUT
            + ip("fc1", "data", 3, 'param { name: "w" lr_mult: 3 }')
            + ip("fc2", "fc1", 3, 'param { name: "w" lr_mult: 2 }')
        )


def test_permissive_sharing():
    same = 'param { name: "w" share_mode: PERMISSIVE }'
    net = build(INPUT + ip("fc1", "data", 3, same) + ip("fc2", "fc1", 3, same))
    assert net.params["fc1"][0] is net.params["fc2"][0]
    # weights 4 x 3 and, transposed, 3 x 4: Caffe shares the memory, one tensor cannot
    transposed = ip("fc2", "data", 4, same).replace(
        "num_output: 4", "num_output: 4 transpose: true"
    )
    with pytest.raises(
        CaffeAlexError,
        match=r"PERMISSIVE sharing of 'w' \(blob 0\) with a "
        r"different shape \(\[3, 4\] here, \[4, 3\] in layer 'fc1'\)",
    ):
        build(INPUT + ip("fc1", "data", 4, same) + transposed)


IN_PLACE_CHAIN = """
name: "chain"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_in_place_chain_matches_opencv():
    net = build(IN_PLACE_CHAIN)
    assert net.layer("relu").in_place and net.layer("relu2").in_place
    # OpenCV names outputs by layer: "pool" and "prob" see the whole in-place chains
    errors = compare_with_opencv(IN_PLACE_CHAIN, ["pool", "prob"])
    assert max(errors.values()) <= 1e-5
