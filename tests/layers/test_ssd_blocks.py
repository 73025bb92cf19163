"""SSD's "Permute" and "Normalize" against NumPy transcriptions of the fork's C++
(permute_layer.cpp, normalize_layer.cpp, forward and backward), OpenCV 4, float64 gradcheck,
and the runtime variants (channels_last, bf16, torch.compile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import (
    check_runtime_variants,
    gradcheck_net,
    opencv_forward,
    parse_net,
    randomize,
    relative_error,
)


def one_layer_net(kind: str, params: str, shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "ssd_block_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "out" type: "{kind}" bottom: "data" top: "out" {params} }}
"""


# ---- Permute --------------------------------------------------------------------------------


def fork_permute(x: np.ndarray, order) -> np.ndarray:
    """PermuteLayer: the listed axes, then the missing ones in order; each top element read
    from the bottom through the old and new strides, as the fork's loop does."""
    full = list(order) + [a for a in range(x.ndim) if a not in order]
    new_shape = [x.shape[a] for a in full]
    old_steps = [int(np.prod(x.shape[a + 1 :])) for a in range(x.ndim)]
    new_steps = [int(np.prod(new_shape[a + 1 :])) for a in range(x.ndim)]
    flat, out = x.reshape(-1), np.empty(x.size, x.dtype)
    for i in range(x.size):
        old, rest = 0, i
        for j in range(x.ndim):
            old += (rest // new_steps[j]) * old_steps[full[j]]
            rest %= new_steps[j]
        out[i] = flat[old]
    return out.reshape(new_shape)


def permute_params(order) -> str:
    return "permute_param { " + " ".join(f"order: {a}" for a in order) + " }"


@pytest.mark.parametrize(
    "order,shape",
    [
        ((0, 2, 3, 1), (2, 3, 4, 5)),
        ((0, 2, 3), (2, 3, 4, 5)),  # axis 1 appended: the same as the line above
        ((3, 1), (2, 3, 4, 5)),
        ((), (2, 3, 4)),
        ((0, 1, 2), (2, 3, 4)),
        ((2,), (2, 3, 4)),
        ((1, 0), (3, 5)),
        ((4, 0, 2), (1, 2, 3, 2, 2)),
    ],
)
def test_permute_matches_fork_transcription(order, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    net = Net(parse_net(one_layer_net("Permute", permute_params(order), shape)))
    out = net(data=torch.from_numpy(x))["out"]
    expected = fork_permute(x, order)
    assert tuple(out.shape) == net.blob_shapes["out"] == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize(
    "order,shape", [((0, 2, 3, 1), (2, 3, 4, 5)), ((0, 3, 1, 2), (1, 6, 2, 3))]
)
def test_permute_matches_opencv(order, shape):
    # OpenCV needs every axis listed; its outputs are compared exactly (a pure copy)
    net_text = one_layer_net("Permute", permute_params(order), shape)
    net = Net(parse_net(net_text))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    theirs = opencv_forward(net_text, net, {"data": x}, ["out"])["out"]
    np.testing.assert_array_equal(net(data=torch.from_numpy(x))["out"].numpy(), theirs)


@pytest.mark.parametrize("order,shape", [((0, 2, 3, 1), (2, 3, 2, 2)), ((2, 0), (2, 3, 4))])
def test_permute_gradcheck(order, shape):
    gradcheck_net(one_layer_net("Permute", permute_params(order), shape))


@pytest.mark.parametrize(
    "order,message",
    [
        ((0, 4), "permute_param.order 4 is out of range for the 4-D bottom"),
        ((1, 1), "permute_param.order lists axis 1 twice"),
    ],
)
def test_permute_bad_order_rejected(order, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(one_layer_net("Permute", permute_params(order), (2, 3, 4, 5))))


# ---- Normalize ------------------------------------------------------------------------------


def norm_params(across: bool, shared: bool, extra: str = "") -> str:
    return (
        f"norm_param {{ across_spatial: {str(across).lower()} "
        f"channel_shared: {str(shared).lower()} {extra} }}"
    )


def fork_normalize(x, scale, across, shared, eps):
    """NormalizeLayer::Forward_cpu per image: norm = sqrt(sum of squares + eps) over C*H*W
    (across_spatial: the image scaled by 1 / norm) or over C at each position (divided by it),
    then times the scale (one, or one per channel). x is N x C x S (S = H * W)."""
    out, norms = np.empty_like(x), []
    for n in range(x.shape[0]):
        if across:
            norm = np.sqrt(np.sum(x[n] ** 2) + eps)
            top = x[n] * (1.0 / norm)
        else:
            norm = np.sqrt(eps + np.sum(x[n] ** 2, axis=0))
            top = x[n] / norm[None, :]
        norms.append(norm)
        out[n] = top * (scale.reshape(()) if shared else scale.reshape(-1, 1))
    return out, norms


def fork_normalize_backward(x, top, dy, scale, norms, across, shared):
    """NormalizeLayer::Backward_cpu: the scale's diff from top * dy / scale, the bottom's as
    (dy - x * <x, dy> / norm^2) / norm, times the scale."""
    if shared:
        dscale = np.sum(top * dy) / scale.reshape(())
    else:
        dscale = np.sum((top * dy).sum(axis=2), axis=0) / scale.reshape(-1)
    dx = np.empty_like(x)
    for n in range(x.shape[0]):
        if across:
            a = np.sum(x[n] * dy[n])
            diff = (dy[n] - x[n] * (a / norms[n] / norms[n])) * (1.0 / norms[n])
        else:
            a = np.sum(x[n] * dy[n], axis=0)
            diff = (dy[n] - x[n] * a[None] / norms[n][None] ** 2) / norms[n][None]
        dx[n] = diff * (scale.reshape(()) if shared else scale.reshape(-1, 1))
    return dx, dscale.reshape(scale.shape)


MODES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("across,shared", MODES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 6), (3, 4, 5)])
@pytest.mark.parametrize("eps", [1e-10, 0.7])  # a large eps shows where it goes
def test_normalize_forward_and_backward_match_fork(across, shared, shape, eps):
    params = norm_params(across, shared, f"eps: {eps}")
    net = Net(parse_net(one_layer_net("Normalize", params, shape))).double()
    randomize(net, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = net(data=x)["out"]
    out.backward(dy)
    scale_blob = net.params["out"][0]
    scale = scale_blob.detach().numpy()
    flat = (shape[0], shape[1], -1)
    eps32 = float(np.float32(eps))
    top, norms = fork_normalize(x.detach().numpy().reshape(flat), scale, across, shared, eps32)
    np.testing.assert_allclose(out.detach().numpy().reshape(flat), top, rtol=1e-12, atol=0)
    dx, dscale = fork_normalize_backward(
        x.detach().numpy().reshape(flat), top, dy.numpy().reshape(flat), scale, norms, across,
        shared,
    )  # fmt: skip
    np.testing.assert_allclose(x.grad.numpy().reshape(flat), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scale_blob.grad.numpy(), dscale, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("across,shared", MODES)
def test_normalize_gradcheck(across, shared):
    # SSD's bottom diff is the true gradient only with one shared scale; its scale diff always
    text = one_layer_net("Normalize", norm_params(across, shared), (2, 3, 2, 3))
    gradcheck_net(text, check_inputs=None if shared else [])


@pytest.mark.parametrize("across", [True, False])
def test_normalize_per_channel_backward_is_ssds_not_the_gradient(across):
    text = one_layer_net("Normalize", norm_params(across, False), (1, 3, 2, 2))
    net = Net(parse_net(text)).double()
    with torch.no_grad():
        net.params["out"][0].copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    net(data=ours)["out"].sum().backward()
    dims = (1, 2, 3) if across else (1,)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    (plain / (plain.square().sum(dims, keepdim=True) + 1e-10).sqrt() * scale).sum().backward()
    assert (ours.grad - plain.grad).abs().max() > 0.1


@pytest.mark.parametrize(
    "across,shared,extra",
    [
        (False, False, 'scale_filler { type: "constant" value: 20 }'),
        (True, True, ""),
        (False, True, "eps: 0.5"),
        (False, False, "eps: 0.25"),
    ],
)
def test_normalize_matches_opencv(across, shared, extra):
    # (OpenCV fails on across_spatial without channel_shared, and reads a one-value scale
    # blob only with one axis: it gets the same value as [1])
    text = one_layer_net("Normalize", norm_params(across, shared, extra), (2, 4, 5, 7))
    net = Net(parse_net(text))
    randomize(net, seed=5)
    x = np.random.default_rng(5).standard_normal((2, 4, 5, 7)).astype(np.float32)
    ours = net(data=torch.from_numpy(x))["out"].detach().numpy()
    blob = net.params["out"][0]
    blob.data = blob.data.reshape(-1)
    theirs = opencv_forward(text, net, {"data": x}, ["out"])["out"]
    assert relative_error(ours, theirs) <= 1e-6


def test_normalize_blobs_and_fillers():
    shared = Net(parse_net(one_layer_net("Normalize", norm_params(True, True), (1, 3, 2, 2))))
    assert shared.params["out"][0].shape == () and shared.params["out"][0].item() == 1.0
    text = one_layer_net(
        "Normalize",
        norm_params(False, False, 'scale_filler { type: "constant" value: 20 }'),
        (1, 5, 2, 2),
    )
    per_channel = Net(parse_net(text))
    torch.testing.assert_close(per_channel.params["out"][0].detach(), torch.full((5,), 20.0))
    assert Net(parse_net(one_layer_net("Normalize", "", (1, 3, 2, 2)))).params["out"][0].shape == ()


@pytest.mark.slow
def test_runtime_variants():
    # channels_last, bf16 and torch.compile (forward and SSD's backward) on a Permute after a
    # per-channel Normalize (as SSD's conv4_3_norm feeds its heads)
    text = f"""name: "ssd_head"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} }} }}
layer {{ name: "norm" type: "Normalize" bottom: "data" top: "norm" {norm_params(False, False)} }}
layer {{ name: "out" type: "Permute" bottom: "norm" top: "out" {permute_params((0, 2, 3, 1))} }}
"""
    net = Net(parse_net(text))
    check_runtime_variants(net, torch.randn(2, 3, 4, 5))


@pytest.mark.parametrize(
    "shape,message",
    [((6,), "at least 2 axes"), ((1, 2, 3, 4, 5), "at most 4 axes")],
)
def test_normalize_bad_bottom_rejected(shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(one_layer_net("Normalize", norm_params(True, True), shape)))
