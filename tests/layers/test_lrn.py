"""LRN against OpenCV 4, a NumPy transcription of Caffe's forward, float64 gradcheck and
autograd through a plain float64 reference (which proves the closed-form backward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_alex.errors import CaffeAlexError
from caffe_alex.layers.lrn import channel_window_sum, cross_channel_lrn
from caffe_alex.net import Net
from tests.reference import compare_with_opencv, gradcheck_net, parse_net, relative_error


def lrn_net(params: str, shape=(2, 6, 5, 4)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""name: "lrn_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "norm" type: "LRN" bottom: "data" top: "norm" lrn_param {{ {params} }} }}
"""


def caffe_lrn(x: np.ndarray, size, alpha, beta, k, within=False) -> np.ndarray:
    """Caffe's LRN forward in float64: windows clipped at the edges; WITHIN_CHANNEL through
    Caffe's AVE pooling rule (divide by the window clipped to [-pad, H + pad), k unused)."""
    n, c, h, w = x.shape
    sq = x.astype(np.float64) ** 2
    pad = (size - 1) // 2
    if not within:
        scale = np.empty_like(sq)
        for ch in range(c):
            lo, hi = max(ch - pad, 0), min(ch + pad + 1, c)
            scale[:, ch] = k + alpha / size * sq[:, lo:hi].sum(axis=1)
        return x / scale**beta
    pooled = np.empty_like(sq)
    for i in range(h):
        for j in range(w):
            hs, ws = i - pad, j - pad
            he, we = min(hs + size, h + pad), min(ws + size, w + pad)
            area = (he - hs) * (we - ws)
            window = sq[:, :, max(hs, 0) : min(he, h), max(ws, 0) : min(we, w)]
            pooled[:, :, i, j] = window.sum(axis=(2, 3)) / area
    return x * (1 + alpha * pooled) ** -beta


def lrn_reference_torch(x, size, alpha, beta, k):
    """The ACROSS_CHANNELS forward formula as plain torch ops (autograd differentiates it)."""
    pad = (size - 1) // 2
    sq = F.pad(x * x, (0, 0, 0, 0, pad, pad))
    window = sum(sq[:, j : j + x.shape[1]] for j in range(size))
    return x / (k + alpha / size * window) ** beta


ACROSS = [  # (shape, local_size, alpha, beta, k)
    ((2, 96, 13, 13), 5, 1e-4, 0.75, 1.0),  # AlexNet norm1/norm2 settings
    ((2, 6, 5, 4), 3, 1.0, 0.5, 1.0),
    ((2, 7, 3, 5), 5, 2.0, 0.75, 1.0),
    ((1, 3, 4, 4), 7, 3.0, 1.5, 1.0),  # fewer channels than local_size
    ((1, 2, 3, 3), 5, 1.0, 0.75, 1.0),
    ((2, 4, 3, 3), 1, 1.0, 0.75, 1.0),
]
WITHIN = [  # (shape, local_size, alpha, beta)
    ((2, 3, 6, 5), 3, 2.0, 0.75),
    ((1, 2, 7, 7), 5, 1.0, 0.6),
    ((1, 2, 2, 3), 5, 3.0, 1.0),  # window larger than the image
    ((1, 2, 4, 4), 1, 1.0, 0.75),
]


@pytest.mark.parametrize("shape,size,alpha,beta,k", ACROSS)
def test_across_matches_opencv(shape, size, alpha, beta, k):
    params = f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}"
    # AlexNet's alpha only bites on large activations: feed conv-sized values.
    scale = 30.0 if alpha < 1e-3 else 1.0
    compare_with_opencv(lrn_net(params, shape), input_scale=scale, tol=2e-6)


@pytest.mark.parametrize("shape,size,alpha,beta", WITHIN)
@pytest.mark.parametrize("k", [1.0, 5.0])
def test_within_matches_opencv(shape, size, alpha, beta, k):
    params = f"local_size: {size} alpha: {alpha} beta: {beta} k: {k} norm_region: WITHIN_CHANNEL"
    compare_with_opencv(lrn_net(params, shape), tol=2e-6)


def run(params, x):
    net = Net(parse_net(lrn_net(params, x.shape)))
    return net(data=torch.from_numpy(x))["norm"].detach().numpy()


@pytest.mark.parametrize("k", [1.0, 2.0, 0.5])  # OpenCV ignores Caffe's k (always 1)
@pytest.mark.parametrize("shape,size,alpha,beta,_", ACROSS)
def test_across_matches_numpy(shape, size, alpha, beta, _, k):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 3
    ours = run(f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}", x)
    assert relative_error(ours, caffe_lrn(x, size, alpha, beta, k)) < 1e-6


@pytest.mark.parametrize("shape,size,alpha,beta", WITHIN)
def test_within_matches_numpy(shape, size, alpha, beta):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32) * 2
    params = f"local_size: {size} alpha: {alpha} beta: {beta} k: 9 norm_region: WITHIN_CHANNEL"
    ours = run(params, x)
    assert relative_error(ours, caffe_lrn(x, size, alpha, beta, None, within=True)) < 1e-6


@pytest.mark.parametrize(
    "params,shape",
    [
        ("local_size: 3 alpha: 1.5 beta: 0.75 k: 2", (2, 4, 3, 2)),
        ("local_size: 5 alpha: 2 beta: 0.6 k: 1", (1, 3, 2, 3)),
        ("local_size: 3 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL", (2, 2, 3, 4)),
    ],
)
def test_gradcheck(params, shape):
    gradcheck_net(lrn_net(params, shape))


@pytest.mark.parametrize(
    "shape,size,alpha,beta,k",
    [
        ((3, 11, 4, 5), 5, 2.0, 0.75, 1.0),
        ((2, 3, 3, 3), 7, 1.0, 1.3, 0.5),
        ((2, 8, 2, 2), 3, 0.5, 0.25, 2.0),
        ((1, 5, 3, 2), 1, 1.0, 0.75, 1.0),
    ],
)
def test_closed_form_backward_matches_autograd(shape, size, alpha, beta, k):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = cross_channel_lrn(ours_x, size, alpha, beta, k)
    ref = lrn_reference_torch(ref_x, size, alpha, beta, k)
    ours.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    # and in float32, against the float64 truth
    x32 = x.float().requires_grad_()
    cross_channel_lrn(x32, size, alpha, beta, k).backward(dy.float())
    assert relative_error(x32.grad.numpy(), ref_x.grad.numpy()) < 1e-6


@pytest.mark.parametrize("channels,half", [(1, 2), (2, 2), (5, 2), (9, 3), (4, 0)])
def test_channel_window_sum_clips_at_edges(channels, half):
    t = torch.randn(2, channels, 3, 1, dtype=torch.float64)
    expected = torch.stack(
        [t[:, max(c - half, 0) : c + half + 1].sum(1) for c in range(channels)], dim=1
    )
    torch.testing.assert_close(channel_window_sum(t, half), expected)
    torch.testing.assert_close(channel_window_sum(t, half, 0.25), expected * 0.25)


def test_channels_last_bf16_autocast_and_compile():
    x = torch.randn(2, 16, 5, 5) * 4
    net = Net(parse_net(lrn_net("local_size: 5 alpha: 1 beta: 0.75 k: 2", x.shape)))
    ref = net(data=x)["norm"]
    last = net(data=x.to(memory_format=torch.channels_last))["norm"]
    torch.testing.assert_close(last, ref, rtol=1e-6, atol=1e-6)
    low = net(data=x.bfloat16())["norm"]
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = net(data=x)["norm"]
    torch.testing.assert_close(auto.float(), ref)
    xg = x.clone().requires_grad_()
    torch._dynamo.reset()  # every Net shares Net.forward: stay under dynamo's recompile limit
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = compiled(data=xg)["norm"]
    out.sum().backward()
    xe = x.clone().requires_grad_()
    net(data=xe)["norm"].sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xg.grad, xe.grad)


@pytest.mark.parametrize(
    "params,shape,message",
    [
        ("local_size: 4", (1, 3, 4, 4), "local_size must be odd"),
        ("local_size: 0", (1, 3, 4, 4), "local_size must be odd"),
        ("local_size: 3", (2, 3, 4), "4 axes"),
    ],
)
def test_bad_config_rejected(params, shape, message):
    with pytest.raises(CaffeAlexError, match=message):
        Net(parse_net(lrn_net(params, shape)))


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_negative_power_close_to_the_exact_power(beta):
    from caffe_alex.layers.lrn import negative_power

    scale = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e3 + 1
    exact = scale.double().pow(-beta)
    relative = (negative_power(scale, beta).double() - exact).abs() / exact
    assert relative.max() < 6 * 2.0**-24


@pytest.fixture
def fused_kernels(monkeypatch):
    """A fresh set of the fused LRN kernels, used from any size, with its compiled calls
    counted."""
    from caffe_alex.layers import lrn

    kernels = lrn._FusedKernels()
    kernels.enabled = True
    kernels.calls = []
    run = kernels._run

    def counted(compiled, *args):
        out = run(compiled, *args)
        kernels.calls.append(out is not None)
        return out

    kernels._run = counted
    monkeypatch.setattr(lrn, "FUSED", kernels)
    monkeypatch.setattr(lrn, "FUSED_FROM", 0)
    return kernels


@pytest.mark.subprocess  # inductor compiles two kernels with g++ (about 12 s on a fresh machine)
@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1e-4, 0.75, 1.0), (3, 2.0, 0.6, 2.0)])
def test_fused_training_kernels_equal_the_eager_ops_and_caffes_formula(fused_kernels, size,
                                                                       alpha, beta, k):  # fmt: skip
    """Where a gradient is recorded on a large CPU tensor, LRN runs inductor's fused forward and
    backward: as close to the float64 formula as the eager ops, values and gradients."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 12, 6, 5, generator=gen) * 8
    dy = torch.randn(x.shape, generator=gen)
    fused_x = x.clone().requires_grad_()
    fused = cross_channel_lrn(fused_x, size, alpha, beta, k)
    fused.backward(dy)
    assert fused_kernels.calls == [True, True]  # the forward and the backward, compiled
    fused_kernels.enabled = False
    eager_x = x.clone().requires_grad_()
    eager = cross_channel_lrn(eager_x, size, alpha, beta, k)
    eager.backward(dy)
    assert fused_kernels.calls == [True, True]
    exact_x = x.double().requires_grad_()
    exact = lrn_reference_torch(exact_x, size, alpha, beta, k)
    exact.backward(dy.double())
    for ours, theirs in ((fused, eager), (fused_x.grad, eager_x.grad)):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    assert relative_error(fused.detach().numpy(), exact.detach().numpy()) < 1e-6
    assert relative_error(fused_x.grad.numpy(), exact_x.grad.numpy()) < 1e-6


def test_fused_kernels_only_where_a_gradient_is_recorded_on_a_large_cpu_tensor(monkeypatch):
    from caffe_alex.layers import lrn

    kernels = lrn._FusedKernels()
    monkeypatch.setattr(kernels, "enabled", True)
    big = torch.zeros(1, 1, 1, lrn.FUSED_FROM)
    assert kernels.pays(big)
    assert not kernels.pays(big[..., 1:].contiguous())  # one element short
    assert not kernels.pays(big.double()) and not kernels.pays(big.bfloat16())
    monkeypatch.setenv("CAFFE_ALEX_FUSED_LRN", "0")
    assert not lrn._FusedKernels().pays(big)
    monkeypatch.setattr(lrn, "FUSED", kernels)
    monkeypatch.setattr(lrn, "FUSED_FROM", 0)
    forwards = []
    monkeypatch.setattr(kernels, "forward", lambda *a: forwards.append(a))
    cross_channel_lrn(torch.randn(2, 6, 3, 3), 5, 1e-4, 0.75, 1.0)  # no gradient to record
    with torch.no_grad():
        cross_channel_lrn(torch.randn(2, 6, 3, 3, requires_grad=True), 5, 1e-4, 0.75, 1.0)
    assert forwards == []
    cross_channel_lrn(torch.randn(2, 6, 3, 3, requires_grad=True), 5, 1e-4, 0.75, 1.0)
    assert len(forwards) == 1


def test_a_fused_kernel_that_fails_to_compile_leaves_the_eager_ops(fused_kernels, monkeypatch,
                                                                   caplog):  # fmt: skip
    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: no_compiler)
    x = torch.randn(2, 6, 3, 3) * 3
    xg = x.clone().requires_grad_()
    with caplog.at_level("WARNING", logger="caffe_alex"):
        y = cross_channel_lrn(xg, 5, 1e-4, 0.75, 1.0)
        y.sum().backward()
    assert fused_kernels.calls == [False] and not fused_kernels.enabled
    assert "failed to compile (RuntimeError: InvalidCxxCompiler" in caplog.text
    assert "more detail" not in caplog.text
    xe = x.clone().requires_grad_()
    fused_kernels.enabled = False
    cross_channel_lrn(xe, 5, 1e-4, 0.75, 1.0).sum().backward()
    assert torch.equal(xg.grad, xe.grad)
