"""BN in its two forks' forms: caffe-segnet (scale/shift, LEARN and INFERENCE) and
yjxiong/PSPNet (slope/bias/running mean/running variance, TRAIN, TEST, frozen). Forward and the
running-statistics update against NumPy transcriptions of each fork's bn_layer.cpp, backward
against transcriptions of their Backward_cpu, float64 gradcheck where the fork's backward is the
true gradient, the form rule, and loading either fork's blob layout."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import parse_net_text
from caffe_alex.layers.segmentation_bn import bn_form
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.reference import caffemodel_bytes, check_runtime_variants, parse_net

SHAPE = (3, 4, 5, 6)


def dims(shape) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def bn_net(params: str, shape=SHAPE, tops=("out",), extra: str = "") -> str:
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "bn_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}
layer {{ name: "bn" type: "BN" bottom: "data" {top_lines} {extra}
  bn_param {{ {params} }} }}
"""


def make(params: str, phase: str = "TEST", shape=SHAPE, tops=("out",), seed=0, extra=""):
    """A float64 net with random blobs (variances positive)."""
    net = Net(parse_net(bn_net(params, shape, tops, extra)), phase).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, blob in enumerate(net.params["bn"]):
            values = torch.randn(blob.shape, generator=gen, dtype=torch.float64)
            blob.copy_(values.abs() + 0.5 if i == 3 else values)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7
    return net, x


def per_channel(v):
    return v.reshape(1, -1, 1, 1)


def sum_nhw(v):
    return v.sum(axis=(0, 2, 3), keepdims=True)


# ---- caffe-segnet transcriptions --------------------------------------------------------


def segnet_learn(x, scale, shift):
    """BNLayer::Forward_cpu, LEARN: means over space then batch, var = E[x^2] - E[x]^2."""
    mean = x.mean(axis=(2, 3)).mean(axis=0)
    var = (x * x).mean(axis=(2, 3)).mean(axis=0) - mean * mean
    std = np.sqrt(var + 1e-9)
    x_norm = (x - per_channel(mean)) / per_channel(std)
    return x_norm * per_channel(scale) + per_channel(shift), mean, var, x_norm, std


def segnet_learn_backward(dy, x_norm, std, scale):
    """BNLayer::Backward_cpu, LEARN."""
    g = dy * per_channel(scale)
    m = x_norm.shape[0] * x_norm.shape[2] * x_norm.shape[3]
    dx = (g - (x_norm * sum_nhw(x_norm * g) + sum_nhw(g)) / m) / per_channel(std)
    return dx, sum_nhw(x_norm * dy), sum_nhw(dy)


def test_segnet_inference_is_scale_and_shift():
    net, x = make("bn_mode: INFERENCE")
    scale, shift = (b.detach().numpy() for b in net.params["bn"])
    assert [tuple(b.shape) for b in net.params["bn"]] == [(1, 4, 1, 1)] * 2
    out = net(data=x)["out"].detach().numpy()
    np.testing.assert_allclose(out, x.numpy() * scale + shift, rtol=1e-15)
    # backward: dx = scale * dy, dscale = sum(x * dy), dshift = sum(dy) (true gradients)
    assert torch.autograd.gradcheck(lambda t: net(data=t)["out"], (x.requires_grad_(),))


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_segnet_learn_uses_batch_statistics_in_every_phase(phase):
    net, x = make("bn_mode: LEARN", phase, tops=("out", "mean", "var"))
    scale, shift = (b.detach().numpy() for b in net.params["bn"])
    x.requires_grad_()
    result = net(data=x)
    y, mean, var, x_norm, std = segnet_learn(x.detach().numpy(), scale, shift)
    np.testing.assert_allclose(result["out"].detach().numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(net.blobs["mean"].numpy(), per_channel(mean), rtol=1e-12)
    np.testing.assert_allclose(net.blobs["var"].numpy(), per_channel(var), rtol=1e-10)
    assert net.blob_shapes["mean"] == net.blob_shapes["var"] == (1, 4, 1, 1)
    dy = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    result["out"].backward(dy)
    dx, dscale, dshift = segnet_learn_backward(dy.numpy(), x_norm, std, scale)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(net.params["bn"][0].grad.numpy(), dscale, rtol=1e-10)
    np.testing.assert_allclose(net.params["bn"][1].grad.numpy(), dshift, rtol=1e-10)


@pytest.mark.slow
def test_segnet_learn_gradcheck():
    net, x = make("bn_mode: LEARN")
    params = list(net.params["bn"])
    assert torch.autograd.gradcheck(lambda t, *p: net(data=t)["out"], (x.requires_grad_(), *params))


def test_segnet_float32_forward_matches_its_transcription():
    net = Net(parse_net(bn_net("bn_mode: LEARN scale_filler { type: 'gaussian' }")), "TEST")
    x = torch.randn(SHAPE) * 3 + 1
    scale, shift = (b.detach().numpy() for b in net.params["bn"])
    y = segnet_learn(x.numpy().astype(np.float64), scale, shift)[0]
    out = net(data=x)["out"].detach().numpy()
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)


def test_segnet_fillers_and_2d_bottom():
    text = bn_net(
        "scale_filler { type: 'constant' value: 1 } shift_filler { type: 'constant' value: 0.001 }",
        shape=(2, 3),
    )
    net = Net(parse_net(text), "TEST")
    scale, shift = net.params["bn"]
    assert torch.equal(scale, torch.ones(1, 3, 1, 1))
    assert torch.allclose(shift, torch.full((1, 3, 1, 1), 0.001))
    assert net.blob_shapes["out"] == (2, 3, 1, 1)  # the fork reshapes its top to 4 axes


# ---- yjxiong/PSPNet transcriptions ------------------------------------------------------


def pspnet_forward(x, slope, bias, mean_blob, var_blob, eps, momentum, batch: bool):
    """BNLayer::Forward_cpu: batch statistics (and the moving averages) in TRAIN, else the
    stored ones. Returns y, x_norm, inv_std and the new moving averages."""
    if batch:
        mean = x.mean(axis=(2, 3)).mean(axis=0)
        centered = x - per_channel(mean)
        var = (centered**2).mean(axis=(2, 3)).mean(axis=0)
        mean_blob = (1 - momentum) * mean + momentum * mean_blob.reshape(-1)
        var_blob = (1 - momentum) * var + momentum * var_blob.reshape(-1)
    else:
        mean, var = mean_blob.reshape(-1), var_blob.reshape(-1)
        centered = x - per_channel(mean)
    inv_std = (var + eps) ** -0.5
    x_norm = centered * per_channel(inv_std)
    y = x_norm * per_channel(slope) + per_channel(bias)
    return y, x_norm, inv_std, mean_blob, var_blob


def pspnet_backward(dy, x_norm, inv_std, slope, frozen: bool):
    """BNLayer::Backward_cpu: frozen scales by slope / std; otherwise the batch formula, also
    when forward used the stored statistics (TEST)."""
    if frozen:
        return dy * per_channel(slope * inv_std), None, None
    g = dy * per_channel(slope)
    m = x_norm.shape[0] * x_norm.shape[2] * x_norm.shape[3]
    dx = (g - (x_norm * sum_nhw(x_norm * g) + sum_nhw(g)) / m) * per_channel(inv_std)
    return dx, sum_nhw(x_norm * dy), sum_nhw(dy)


PSP_CASES = [  # (bn_param, phase, batch statistics?, frozen?)
    ("momentum: 0.95", "TRAIN", True, False),
    ("momentum: 0.9 eps: 1e-3", "TEST", False, False),
    ("frozen: true momentum: 0.95", "TRAIN", False, True),
    ("frozen: true", "TEST", False, True),
]


@pytest.mark.parametrize("params,phase,batch,frozen", PSP_CASES)
def test_pspnet_forward_backward_and_running_statistics(params, phase, batch, frozen):
    net, x = make(params, phase)
    layer = net.layer("bn")
    before = [b.detach().numpy().copy() for b in net.params["bn"]]
    slope, bias, mean_blob, var_blob = (b.reshape(-1) for b in before)
    momentum, eps = layer.momentum, layer.eps
    x.requires_grad_()
    out = net(data=x)["out"]
    y, x_norm, inv_std, new_mean, new_var = pspnet_forward(
        x.detach().numpy(), slope, bias, mean_blob, var_blob, eps, momentum, batch
    )
    np.testing.assert_allclose(out.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    after = [b.detach().numpy() for b in net.params["bn"]]
    np.testing.assert_allclose(after[2].reshape(-1), new_mean, rtol=1e-12)
    np.testing.assert_allclose(after[3].reshape(-1), new_var, rtol=1e-12)
    dy = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out.backward(dy)
    dx, dslope, dbias = pspnet_backward(dy.numpy(), x_norm, inv_std, slope, frozen)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
    blobs = net.params["bn"]
    if frozen:  # the fork leaves slope and bias alone (and forces their lr_mult to 0)
        assert not blobs[0].requires_grad and not blobs[1].requires_grad
    else:
        np.testing.assert_allclose(blobs[0].grad.numpy(), dslope, rtol=1e-10)
        np.testing.assert_allclose(blobs[1].grad.numpy(), dbias, rtol=1e-10)
    assert not blobs[2].requires_grad and not blobs[3].requires_grad


def test_pspnet_test_phase_backward_is_not_the_true_gradient():
    # The fork's TEST backward subtracts the means of the batch formula although forward used
    # stored statistics: for dy = 1 it is -slope * inv_std * x_norm * mean(x_norm), not the
    # true slope * inv_std.
    net, x = make("momentum: 0.9", "TEST")
    slope, _, mean, var = (b.detach() for b in net.params["bn"])
    x.requires_grad_()
    net(data=x)["out"].sum().backward()
    inv_std = (var + net.layer("bn").eps) ** -0.5
    x_norm = (x.detach() - mean) * inv_std
    fork = -slope * inv_std * x_norm * x_norm.mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, fork, rtol=1e-10, atol=1e-12)
    assert (x.grad - slope * inv_std).abs().max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("params,phase", [("momentum: 0.9", "TRAIN"), ("frozen: true", "TRAIN")])
def test_pspnet_gradcheck_where_the_fork_takes_the_true_gradient(params, phase):
    net, x = make(params, phase)
    params = [p for p in net.params["bn"] if p.requires_grad]
    # TRAIN moves the running statistics, which its output does not read

    def run(t, *p):
        return net(data=t)["out"]

    assert torch.autograd.gradcheck(run, (x.requires_grad_(), *params))


def test_pspnet_blobs_fillers_and_param_multipliers():
    text = bn_net(
        "slope_filler { type: 'constant' value: 1 } bias_filler { type: 'constant' value: 0 } "
        "frozen: true momentum: 0.95",
        extra="param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 0 } param { lr_mult: 0 }",
    )
    net = Net(parse_net(text), "TRAIN")
    slope, bias, mean, var = net.params["bn"]
    assert [tuple(b.shape) for b in net.params["bn"]] == [(1, 4, 1, 1)] * 4
    assert torch.equal(slope, torch.ones(1, 4, 1, 1)) and torch.equal(var, torch.ones(1, 4, 1, 1))
    assert torch.equal(mean, torch.zeros(1, 4, 1, 1))  # frozen: variance starts at 1
    assert [info.lr_mult for info in net.param_infos] == [0, 0, 0, 0]  # frozen forces 0
    net = Net(parse_net(bn_net("momentum: 0.9")), "TRAIN")
    assert torch.equal(net.params["bn"][3], torch.zeros(1, 4, 1, 1))
    assert [info.lr_mult for info in net.param_infos] == [1, 1, 0, 0]


def test_pspnet_keeps_the_bottom_shape():
    net = Net(parse_net(bn_net("eps: 1e-5", shape=(2, 3))), "TEST")
    assert net.blob_shapes["out"] == (2, 3)
    assert tuple(net(data=torch.randn(2, 3))["out"].shape) == (2, 3)


# ---- which form ----------------------------------------------------------------------


def _layer(text: str) -> caffe_pb2.LayerParameter:
    return parse_net(f'name: "n" layer {{ name: "bn" type: "BN" {text} }}').layer[0]


@pytest.mark.parametrize(
    "text,form",
    [
        ("bn_param { bn_mode: INFERENCE }", "segnet"),
        ("bn_param { scale_filler { type: 'constant' } }", "segnet"),
        ("bn_param { frozen: true }", "pspnet"),
        ("bn_param { slope_filler { type: 'constant' } }", "pspnet"),
        ("bn_param { engine: CAFFE }", "pspnet"),
        ("", "pspnet"),  # nothing to go by: the PSPNet form
        ('top: "a" top: "b" top: "c"', "segnet"),  # only caffe-segnet has more tops
        ("blobs { shape { dim: 1 } } blobs { shape { dim: 1 } }", "segnet"),
        ("blobs {} blobs {} blobs {} blobs {}", "pspnet"),
    ],
)
def test_the_form_follows_the_fields_then_the_blobs(text, form):
    assert bn_form(_layer(text)) == form


def build_error(text: str) -> CaffeAlexError:
    net_param, source = parse_net_text(text, "bn.prototxt")
    with pytest.raises(CaffeAlexError) as info:
        Net(net_param, "TEST", source=source)
    return info.value


@pytest.mark.parametrize(
    "params,tops,message",
    [
        ("bn_mode: LEARN frozen: true", ("out",), r"mixes caffe-segnet's fields \(bn_mode\)"),
        ("bn_mode: INFERENCE", ("out", "m", "v"), r"bn_mode INFERENCE has one top, got 3"),
        ("momentum: 0.9", ("out", "m"), r"yjxiong/PSPNet BN has one top, got 2"),
    ],
)
def test_bad_settings_are_one_error_at_the_layer(params, tops, message):
    error = build_error(bn_net(params, tops=tops))
    assert (error.file, error.line, error.layer, error.layer_type) == ("bn.prototxt", 3, "bn", "BN")
    assert re.search(message, str(error)), str(error)


# ---- loading either fork's caffemodel -----------------------------------------------------


def _write_bn_model(path, blobs):
    """A caffemodel with one BN layer "bn" holding ``blobs`` (arrays, shapes as given)."""
    model = caffe_pb2.NetParameter(name="m")
    layer = model.layer.add(name="bn", type="BN")
    for array in blobs:
        blob = layer.blobs.add()
        blob.shape.dim.extend(array.shape)
        blob.data.extend(array.ravel().tolist())
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def test_yjxiong_1xC_blobs_load_into_the_pspnet_form(tmp_path):
    net = Net(parse_net(bn_net("frozen: true")), "TEST")
    values = [np.arange(4, dtype=np.float32).reshape(1, 4) + i for i in range(4)]
    path = tmp_path / "yjxiong.caffemodel"
    _write_bn_model(path, values)
    net.load_weights(str(path))
    for blob, value in zip(net.params["bn"], values):
        assert torch.equal(blob, torch.from_numpy(value).reshape(1, 4, 1, 1))
    # and our own [1, C, 1, 1] round-trips
    again = tmp_path / "ours.caffemodel"
    again.write_bytes(caffemodel_bytes(net))
    Net(parse_net(bn_net("frozen: true")), "TEST").load_weights(str(again))


def test_a_segnet_model_in_a_pspnet_form_layer_says_how_to_choose(tmp_path):
    net = Net(parse_net(bn_net("")), "TEST")
    path = tmp_path / "segnet.caffemodel"
    _write_bn_model(path, [np.ones((1, 4, 1, 1), np.float32)] * 2)
    with pytest.raises(CaffeAlexError, match=r"2 in .*4 in the net.*set bn_param.bn_mode"):
        net.load_weights(os.fspath(path))
    with pytest.raises(CaffeAlexError, match=r"shape \[4\] in"):  # other shapes stay refused
        _write_bn_model(path, [np.ones(4, np.float32)] * 4)
        net.load_weights(os.fspath(path))


@pytest.mark.parametrize(
    "params,phase", [("bn_mode: LEARN", "TEST"), ("frozen: true", "TRAIN"), ("eps: 1e-4", "TEST")]
)
def test_channels_last_bf16_and_compile(params, phase):
    net, _ = make(params, phase, shape=(2, 4, 5, 6))
    check_runtime_variants(net.float(), torch.randn(2, 4, 5, 6))
