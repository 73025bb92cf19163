"""Region-based detectors' layers (caffe_alex/layers/roi.py): "ROIPooling", "PSROIPooling",
"Proposal".

References: OpenCV's dnn importer (which implements all three), NumPy transcriptions of the
forks' loops written here (caffe-fast-rcnn's ROIPooling forward and backward, R-FCN's
PSROIPooling kernels), float64 gradcheck, and an independent NumPy re-implementation of
py-faster-rcnn's proposal layer (tests/corpus_layers/rpn/proposal_layer.py) run as a Python
layer inside py-faster-rcnn's ZF test net.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.layers import roi as roi_module
from caffe_alex.layers.roi import generate_anchors
from caffe_alex.net import Net
from tests.reference import opencv_forward, parse_net

FORK_NETS = Path(__file__).resolve().parents[1] / "fork_nets"
CORPUS_LAYERS = Path(__file__).resolve().parents[1] / "corpus_layers"
ZF_TEST = (
    FORK_NETS / "rbgirshick__py-faster-rcnn/models/pascal_voc/ZF/faster_rcnn_end2end/test.prototxt"
)
FLT_MAX = float(np.finfo(np.float32).max)


def c_round(v: float) -> int:
    """C's round() of a float: halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def random_rois(rng, count: int, batch: int, low: float, high: float) -> np.ndarray:
    """Rois with corners anywhere in [low, high): some outside the image, some with x2 < x1."""
    rois = np.zeros((count, 5), np.float32)
    rois[:, 0] = rng.integers(0, batch, count)
    rois[:, 1:] = rng.uniform(low, high, (count, 4))
    return rois


def pooling_net(kind: str, data_shape, rois: int, params: str) -> str:
    dims = " ".join(f"dim: {d}" for d in data_shape)
    return f"""name: "pool"
layer {{ name: "in" type: "Input" top: "x" top: "rois"
  input_param {{ shape {{ {dims} }} shape {{ dim: {rois} dim: 5 }} }} }}
layer {{ name: "out" type: "{kind}" bottom: "x" bottom: "rois" top: "out" {params} }}
"""


def run(net: Net, **inputs) -> dict[str, torch.Tensor]:
    return net(**{k: torch.as_tensor(v) for k, v in inputs.items()})


# -- ROIPooling: a transcription of caffe-fast-rcnn's CPU loops ---------------------------


def fork_roi_bins(roi, scale, pooled_h, pooled_w, height, width):
    f32 = np.float32
    sw, sh, ew, eh = (c_round(float(f32(v) * f32(scale))) for v in roi[1:5])
    rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
    bin_h, bin_w = f32(rh) / f32(pooled_h), f32(rw) / f32(pooled_w)
    bins = {}
    for ph in range(pooled_h):
        for pw in range(pooled_w):
            hs = min(max(int(np.floor(f32(ph) * bin_h)) + sh, 0), height)
            he = min(max(int(np.ceil(f32(ph + 1) * bin_h)) + sh, 0), height)
            ws = min(max(int(np.floor(f32(pw) * bin_w)) + sw, 0), width)
            we = min(max(int(np.ceil(f32(pw + 1) * bin_w)) + sw, 0), width)
            bins[ph, pw] = hs, he, ws, we
    return (sh, sw, eh, ew, bin_h, bin_w), bins


def fork_roi_pool(x, rois, pooled_h, pooled_w, scale):
    """Forward_cpu: max over each clipped bin (first maximum kept), 0 and argmax -1 if empty."""
    n, c, height, width = x.shape
    top = np.full((len(rois), c, pooled_h, pooled_w), -FLT_MAX, np.float32)
    arg = np.full(top.shape, -1, np.int64)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        _, bins = fork_roi_bins(roi, scale, pooled_h, pooled_w, height, width)
        for ch in range(c):
            for (ph, pw), (hs, he, ws, we) in bins.items():
                if he <= hs or we <= ws:
                    top[r, ch, ph, pw] = 0
                    continue
                for h in range(hs, he):
                    for w in range(ws, we):
                        if x[b, ch, h, w] > top[r, ch, ph, pw]:
                            top[r, ch, ph, pw] = x[b, ch, h, w]
                            arg[r, ch, ph, pw] = h * width + w
    return top, arg


def fork_roi_pool_backward(x_shape, rois, arg, top_diff, pooled_h, pooled_w, scale):
    """Backward_cpu: for each cell of the roi's (unclipped-order) extent, the sum of the
    gradients of the bins that could hold it and whose argmax is that cell."""
    n, c, height, width = x_shape
    diff = np.zeros(x_shape, np.float64)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        (sh, sw, eh, ew, bin_h, bin_w), _ = fork_roi_bins(
            roi, scale, pooled_h, pooled_w, height, width
        )
        for ch in range(c):
            for h in range(max(0, sh), min(height, eh + 1)):
                for w in range(max(0, sw), min(width, ew + 1)):
                    p0 = min(max(int(np.floor(np.float32(h - sh) / bin_h)), 0), pooled_h)
                    p1 = min(max(int(np.ceil(np.float32(h - sh + 1) / bin_h)), 0), pooled_h)
                    q0 = min(max(int(np.floor(np.float32(w - sw) / bin_w)), 0), pooled_w)
                    q1 = min(max(int(np.ceil(np.float32(w - sw + 1) / bin_w)), 0), pooled_w)
                    for ph in range(p0, p1):
                        for pw in range(q0, q1):
                            if arg[r, ch, ph, pw] == h * width + w:
                                diff[b, ch, h, w] += top_diff[r, ch, ph, pw]
    return diff


ROI_PARAMS = "roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.0625 }"


def test_roipooling_matches_opencv_with_rois_outside_the_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 11)).astype(np.float32)
    rois = random_rois(rng, 60, 2, -40.0, 220.0)  # the map covers [0, 176) x [0, 144) pixels
    text = pooling_net("ROIPooling", x.shape, len(rois), ROI_PARAMS)
    net = Net(parse_net(text), "TEST")
    ours = run(net, x=x, rois=rois)["out"].numpy()
    theirs = opencv_forward(text, net, {"x": x, "rois": rois}, ["out"])["out"]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(("scale", "budget"), [(0.0625, None), (0.5, None), (1.0, None), (0.5, 40)])
def test_roipooling_forward_and_backward_match_the_fork(scale, budget, monkeypatch):
    if budget is not None:  # rois gathered a few at a time, in order of their largest bin
        monkeypatch.setitem(roi_module._GATHER_BUDGET, "cpu", budget)
    rng = np.random.default_rng(1)
    # few distinct values: many ties, so the first-maximum rule decides where gradients go
    x = rng.integers(-3, 4, (2, 3, 7, 8)).astype(np.float32)
    rois = random_rois(rng, 16, 2, -10.0 / scale, 12.0 / scale)
    rois[0, 1:] = [3 / scale, 2 / scale, 1 / scale, 5 / scale]  # x2 < x1: one cell, no gradient
    rois[1, 1:] = [-9 / scale, -9 / scale, -2 / scale, -3 / scale]  # wholly outside: zeros
    rois[2, 1:] = np.array([0.5, 2.5, 4.5, 6.5]) / scale  # halves: C's round goes up, not even
    params = f"roi_pooling_param {{ pooled_h: 2 pooled_w: 3 spatial_scale: {scale} }}"
    net = Net(parse_net(pooling_net("ROIPooling", x.shape, len(rois), params)), "TRAIN")
    xt = torch.from_numpy(x).requires_grad_()
    out = net(x=xt, rois=torch.from_numpy(rois))["out"]
    top, arg = fork_roi_pool(x, rois, 2, 3, scale)
    np.testing.assert_array_equal(out.detach().numpy(), top)
    assert (top[1] == 0).all()
    top_diff = rng.standard_normal(top.shape)
    out.backward(torch.from_numpy(top_diff).float())
    expected = fork_roi_pool_backward(x.shape, rois, arg, top_diff, 2, 3, scale)
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_roipooling_clips_a_roi_partly_outside_to_the_map():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 6, 6)
    rois = torch.tensor([[0, -20.0, -20.0, 3.0, 2.0]])  # covers cells [-20, 3] x [-20, 2]
    params = "roi_pooling_param { pooled_h: 1 pooled_w: 1 spatial_scale: 1 }"
    net = Net(parse_net(pooling_net("ROIPooling", x.shape, 1, params)), "TEST")
    out = net(x=x, rois=rois)["out"]
    torch.testing.assert_close(out.reshape(-1), x[0, :, :3, :4].amax(dim=(1, 2)))


@pytest.mark.slow
def test_roipooling_gradcheck_away_from_ties():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 5, 4], [1, 2, 1, 6, 5], [1, -3, -2, 2, 9]], dtype=torch.float64)
    params = "roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 }"
    net = Net(parse_net(pooling_net("ROIPooling", x.shape, 3, params)), "TRAIN").double()
    assert torch.autograd.gradcheck(lambda t: net(x=t, rois=rois)["out"], (x,), eps=1e-6)


def test_roipooling_batch_index_out_of_range_is_one_error():
    text = pooling_net("ROIPooling", (2, 3, 5, 5), 2, ROI_PARAMS)
    net = Net(parse_net(text), "TEST")
    rois = torch.tensor([[1, 0, 0, 8, 8], [2, 0, 0, 8, 8]], dtype=torch.float32)
    with pytest.raises(CaffeAlexError) as info:
        net(x=torch.zeros(2, 3, 5, 5), rois=rois)
    message = str(info.value)
    assert "layer 'out' (ROIPooling)" in message and "roi 1 has batch index 2" in message
    rois[1, 0] = -1
    with pytest.raises(CaffeAlexError, match="batch index -1"):
        net(x=torch.zeros(2, 3, 5, 5), rois=rois)


@pytest.mark.parametrize(
    ("params", "shape", "needle"),
    [
        ("roi_pooling_param { pooled_w: 3 }", (4, 5), "roi_pooling_param.pooled_h must be > 0"),
        (ROI_PARAMS, (4, 4), "rois (bottom 1) must be R x 5"),
    ],
)
def test_roipooling_configuration_errors_name_the_layer(tmp_path, params, shape, needle):
    text = pooling_net("ROIPooling", (1, 3, 5, 5), 4, params).replace(
        "dim: 4 dim: 5", " ".join(f"dim: {d}" for d in shape)
    )
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    assert needle in str(info.value)
    assert f"{path}:4" in str(info.value) and "layer 'out'" in str(info.value)


# -- PSROIPooling: a transcription of R-FCN's kernels ------------------------------------


def fork_psroi_bins(roi, scale, group, height, width):
    f32 = np.float32
    start_w = f32(float(c_round(float(roi[1])))) * f32(scale)
    start_h = f32(float(c_round(float(roi[2])))) * f32(scale)
    end_w = f32((c_round(float(roi[3])) + 1.0) * float(f32(scale)))
    end_h = f32((c_round(float(roi[4])) + 1.0) * float(f32(scale)))
    roi_w = max(f32(end_w - start_w), f32(0.1))
    roi_h = max(f32(end_h - start_h), f32(0.1))
    bin_w, bin_h = f32(roi_w / f32(group)), f32(roi_h / f32(group))
    for ph in range(group):
        for pw in range(group):
            hs = int(np.floor(f32(f32(ph) * bin_h) + start_h))
            ws = int(np.floor(f32(f32(pw) * bin_w) + start_w))
            he = int(np.ceil(f32(f32(ph + 1) * bin_h) + start_h))
            we = int(np.ceil(f32(f32(pw + 1) * bin_w) + start_w))
            hs, he = min(max(hs, 0), height), min(max(he, 0), height)
            ws, we = min(max(ws, 0), width), min(max(we, 0), width)
            yield ph, pw, hs, he, ws, we


def fork_psroi_pool(x, rois, scale, output_dim, group):
    n, c, height, width = x.shape
    top = np.zeros((len(rois), output_dim, group, group), np.float32)
    for r, roi in enumerate(rois):
        for ph, pw, hs, he, ws, we in fork_psroi_bins(roi, scale, group, height, width):
            for ctop in range(output_dim):
                ch = (ctop * group + ph) * group + pw
                if he > hs and we > ws:
                    cells = x[int(roi[0]), ch, hs:he, ws:we].astype(np.float64)
                    top[r, ctop, ph, pw] = cells.sum() / ((he - hs) * (we - ws))
    return top


def fork_psroi_backward(x_shape, rois, top_diff, scale, output_dim, group):
    n, c, height, width = x_shape
    diff = np.zeros(x_shape, np.float64)
    for r, roi in enumerate(rois):
        for ph, pw, hs, he, ws, we in fork_psroi_bins(roi, scale, group, height, width):
            if he <= hs or we <= ws:
                continue
            for ctop in range(output_dim):
                ch = (ctop * group + ph) * group + pw
                share = top_diff[r, ctop, ph, pw] / ((he - hs) * (we - ws))
                diff[int(roi[0]), ch, hs:he, ws:we] += share
    return diff


def psroi_params(scale=0.0625, output_dim=2, group=3) -> str:
    return (
        f"psroi_pooling_param {{ spatial_scale: {scale} output_dim: {output_dim} "
        f"group_size: {group} }}"
    )


def test_psroipooling_matches_opencv():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2 * 9, 9, 11)).astype(np.float32)
    rois = random_rois(rng, 50, 2, -40.0, 220.0)
    text = pooling_net("PSROIPooling", x.shape, len(rois), psroi_params())
    net = Net(parse_net(text), "TEST")
    ours = run(net, x=x, rois=rois)["out"].numpy()
    theirs = opencv_forward(text, net, {"x": x, "rois": rois}, ["out"])["out"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_psroipooling_forward_and_backward_match_the_fork():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3 * 4, 8, 10)).astype(np.float32)
    rois = random_rois(rng, 20, 2, -30.0, 180.0)
    rois[0, 1:] = [50, 50, 20, 10]  # x2 < x1: a 0.1-cell roi
    rois[1, 1:] = [-90, -80, -40, -30]  # wholly outside: every bin empty
    rois[2, 1:] = [8.5, 24.5, 72.5, 88.5]  # halves: C's round goes up, not to even
    params = psroi_params(scale=0.0625, output_dim=3, group=2)
    net = Net(parse_net(pooling_net("PSROIPooling", x.shape, len(rois), params)), "TRAIN")
    xt = torch.from_numpy(x).requires_grad_()
    out = net(x=xt, rois=torch.from_numpy(rois))["out"]
    expected = fork_psroi_pool(x, rois, 0.0625, 3, 2)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (expected[1] == 0).all()
    top_diff = rng.standard_normal(expected.shape)
    out.backward(torch.from_numpy(top_diff).float())
    grad = fork_psroi_backward(x.shape, rois, top_diff, 0.0625, 3, 2)
    np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_psroipooling_gradcheck():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2 * 4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 40, 30], [0, 20, 10, 90, 70]], dtype=torch.float64)
    params = psroi_params(scale=0.0625, output_dim=2, group=2)
    net = Net(parse_net(pooling_net("PSROIPooling", x.shape, 2, params)), "TRAIN").double()
    assert torch.autograd.gradcheck(lambda t: net(x=t, rois=rois)["out"], (x,), eps=1e-6)


def test_psroipooling_batch_index_out_of_range_is_one_error():
    net = Net(parse_net(pooling_net("PSROIPooling", (1, 18, 5, 5), 1, psroi_params())), "TEST")
    with pytest.raises(CaffeAlexError, match=r"layer 'out' \(PSROIPooling\).*batch index 3"):
        net(x=torch.zeros(1, 18, 5, 5), rois=torch.tensor([[3.0, 0, 0, 9, 9]]))


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (
            "psroi_pooling_param { spatial_scale: 0.0625 group_size: 3 }",
            "psroi_pooling_param.output_dim is required",
        ),
        ("psroi_pooling_param { output_dim: 2 group_size: 3 }", "spatial_scale is required"),
        (psroi_params(output_dim=0), "psroi_pooling_param.output_dim must be > 0"),
        (psroi_params(output_dim=3), "input channel number does not match"),
    ],
)
def test_psroipooling_configuration_errors_name_file_line_layer_and_field(tmp_path, params, needle):
    path = tmp_path / "rfcn.prototxt"
    path.write_text(pooling_net("PSROIPooling", (1, 18, 5, 5), 2, params))
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    message = str(info.value)
    assert needle in message
    assert message.startswith(f"{path}:4") and "layer 'out' (PSROIPooling)" in message


# -- Proposal ------------------------------------------------------------------------------


def test_anchors_are_py_faster_rcnns():
    # the nine anchors generate_anchors.py's comment lists for base 16, ratios 0.5 1 2,
    # scales 8 16 32, from the MATLAB Faster R-CNN, whose pixels count from 1; py-faster-rcnn's
    # count from 0, one less
    matlab = [
        [-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
        [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
        [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360],
    ]  # fmt: skip
    expected = np.array(matlab) - 1
    np.testing.assert_array_equal(generate_anchors(16, [0.5, 1, 2], [8, 16, 32]), expected)


def proposal_net(a: int, h: int, w: int, params: str, tops=("rois", "scores")) -> str:
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "rpn"
layer {{ name: "in" type: "Input" top: "prob" top: "deltas" top: "im_info"
  input_param {{ shape {{ dim: 1 dim: {2 * a} dim: {h} dim: {w} }}
                 shape {{ dim: 1 dim: {4 * a} dim: {h} dim: {w} }} shape {{ dim: 1 dim: 3 }} }} }}
layer {{ name: "rois" type: "Proposal" bottom: "prob" bottom: "deltas" bottom: "im_info"
  {top_lines} proposal_param {{ {params} }} }}
"""


def rpn_inputs(rng, a: int, h: int, w: int, im_scale: float, spread: float = 0.3):
    fg = rng.uniform(0, 1, (1, a, h, w)).astype(np.float32)
    prob = np.concatenate([1 - fg, fg], axis=1)
    deltas = (rng.standard_normal((1, 4 * a, h, w)) * spread).astype(np.float32)
    info = np.array([[h * 16 - 7, w * 16 - 3, im_scale]], np.float32)
    return prob, deltas, info


def reference_proposals(prob, deltas, info, phase="TEST", param_str="'feat_stride': 16"):
    """tests/corpus_layers/rpn/proposal_layer.py run by hand on pycaffe Blobs."""
    import sys

    sys.path.insert(0, str(CORPUS_LAYERS))
    try:
        from rpn.proposal_layer import ProposalLayer
    finally:
        sys.path.remove(str(CORPUS_LAYERS))
    from caffe_alex.blob import Blob
    from caffe_alex.layers.python import Phase

    layer = ProposalLayer()
    layer.param_str_ = param_str
    layer.phase = Phase(0 if phase == "TRAIN" else 1)
    bottom = [Blob(torch.from_numpy(v.copy())) for v in (prob, deltas, info)]
    top = [Blob(torch.zeros(0)), Blob(torch.zeros(0))]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    return top[0].data.copy(), top[1].data.copy()


TEST_SETTINGS = (
    "feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 ratio: 1 ratio: 2 "
    "scale: 8 scale: 16 scale: 32 pre_nms_topn: 6000 post_nms_topn: 300 nms_thresh: 0.7"
)


@pytest.mark.parametrize("im_scale", [1.0, 1.6, 0.5])
def test_proposal_matches_py_faster_rcnn(im_scale):
    rng = np.random.default_rng(7)
    prob, deltas, info = rpn_inputs(rng, 9, 10, 13, im_scale, spread=0.6)
    net = Net(parse_net(proposal_net(9, 10, 13, TEST_SETTINGS)), "TEST")
    run(net, prob=prob, deltas=deltas, im_info=info)
    rois, scores = reference_proposals(prob, deltas, info)
    assert 0 < rois.shape[0] < 300  # min_size and NMS both removed boxes
    np.testing.assert_allclose(net.blobs["rois"].numpy(), rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(net.blobs["scores"].numpy(), scores)


def test_proposal_min_size_filter_and_topn_limits():
    rng = np.random.default_rng(8)
    prob, deltas, info = rpn_inputs(rng, 9, 6, 7, 2.0, spread=1.0)
    settings = TEST_SETTINGS.replace("pre_nms_topn: 6000", "pre_nms_topn: 40").replace(
        "post_nms_topn: 300", "post_nms_topn: 7"
    )
    net = Net(parse_net(proposal_net(9, 6, 7, settings, tops=("rois",))), "TEST")
    rois = run(net, prob=prob, deltas=deltas, im_info=info)["rois"].numpy()
    assert rois.shape == (7, 5) and (rois[:, 0] == 0).all()
    sides = rois[:, 3:5] - rois[:, 1:3] + 1
    assert (sides >= 16 * 2.0).all()
    assert (rois[:, 1:] >= 0).all() and (rois[:, [1, 3]] <= info[0, 1] - 1).all()


def test_proposal_matches_opencv_which_skips_min_size_and_pads_rows():
    rng = np.random.default_rng(9)
    # im_scale 1/16: min_size * scale = 1 pixel, which every clipped box has, so OpenCV (which
    # does not apply min_size) and the fork keep the same boxes
    prob, deltas, info = rpn_inputs(rng, 9, 8, 9, 0.0625, spread=0.5)
    settings = TEST_SETTINGS.replace("post_nms_topn: 300", "post_nms_topn: 200")
    text = proposal_net(9, 8, 9, settings, tops=("rois",))
    net = Net(parse_net(text), "TEST")
    ours = run(net, prob=prob, deltas=deltas, im_info=info)["rois"].numpy()
    theirs = opencv_forward(text, net, {"prob": prob, "deltas": deltas, "im_info": info}, ["rois"])
    theirs = theirs["rois"]
    kept = ours.shape[0]
    assert 0 < kept < 200 and theirs.shape == (200, 5)  # OpenCV: always post_nms_topn rows
    np.testing.assert_allclose(ours, theirs[:kept], rtol=1e-6, atol=1e-4)
    assert (theirs[kept:] == 0).all()


@pytest.mark.parametrize(
    ("shapes", "needle"),
    [
        ((2, 18, 4, 4, 36), "only single-image batches"),
        ((1, 16, 4, 4, 36), "9 anchors need 18 score channels and 36"),
    ],
)
def test_proposal_shape_errors(shapes, needle):
    n, c, h, w, d = shapes
    text = proposal_net(9, h, w, TEST_SETTINGS).replace(
        f"shape {{ dim: 1 dim: 18 dim: {h}", f"shape {{ dim: {n} dim: {c} dim: {h}"
    )
    with pytest.raises(CaffeAlexError, match=needle):
        Net(parse_net(text), "TEST")


# -- Faster R-CNN end to end -----------------------------------------------------------------


def scaled_random_weights(net: Net, seed: int) -> None:
    """Gaussian weights of variance 1/fan_in (activations stay of order one through ZF, so the
    RPN's scores are spread, not saturated into ties), small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            for i, blob in enumerate(blobs):
                fan_in = max(1, math.prod(blob.shape[1:])) if i == 0 else 1
                std = 1.0 / math.sqrt(fan_in) if i == 0 else 0.1
                blob.copy_(torch.randn(blob.shape, generator=gen) * std)


PYTHON_PROPOSAL = re.compile(r"layer \{\s*name: 'proposal'\s*type: 'Python'.*?\n\}\n", re.S)
BUILTIN_PROPOSAL = """layer {
  name: 'proposal'
  type: 'Proposal'
  bottom: 'rpn_cls_prob_reshape'
  bottom: 'rpn_bbox_pred'
  bottom: 'im_info'
  top: 'rois'
  proposal_param {
    feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 ratio: 1 ratio: 2
    scale: 8 scale: 16 scale: 32 pre_nms_topn: 6000 post_nms_topn: 300 nms_thresh: 0.7
  }
}
"""


def zf_with_builtin_proposal(folder: Path) -> tuple[str, Path]:
    """ZF's test net with its Python proposal layer replaced by a Proposal layer, as OpenCV's
    users write it: the text and the file holding it."""
    text, found = PYTHON_PROPOSAL.subn(BUILTIN_PROPOSAL, ZF_TEST.read_text())
    assert found == 1
    path = folder / "zf_proposal.prototxt"
    path.write_text(text)
    return text, path


def zf_inputs(im_scale: float):
    rng = np.random.default_rng(10)
    data = rng.standard_normal((1, 3, 100, 132)).astype(np.float32)
    return {"data": data, "im_info": np.array([[100, 132, im_scale]], np.float32)}


@pytest.mark.slow
def test_faster_rcnn_python_proposal_layer_equals_builtin_proposal(monkeypatch, tmp_path):
    """py-faster-rcnn's ZF test net as published (its Python proposal layer, here the NumPy
    re-implementation in py-faster-rcnn's style, imported through `import caffe`) and the same
    net with `type: "Proposal"` give the same rois and detections."""
    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))
    python_net = Net.from_prototxt(str(ZF_TEST), phase="TEST")
    builtin_net = Net.from_prototxt(str(zf_with_builtin_proposal(tmp_path)[1]), phase="TEST")
    scaled_random_weights(python_net, seed=11)
    builtin_net.load_state_dict(python_net.state_dict())
    inputs = {k: torch.from_numpy(v) for k, v in zf_inputs(1.0).items()}
    with torch.no_grad():
        a = python_net(**inputs)
        b = builtin_net(**inputs)
    rois = python_net.blobs["rois"]
    assert 1 < rois.shape[0] <= 300
    torch.testing.assert_close(builtin_net.blobs["rois"], rois, rtol=1e-6, atol=1e-4)
    for name in ("cls_prob", "bbox_pred"):
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_py_faster_rcnn_im_detect_calls_through_pycaffe(monkeypatch):
    """What py-faster-rcnn's lib/fast_rcnn/test.py does with `import caffe`: reshape the inputs,
    forward with keyword blobs, read rois, cls_prob and bbox_pred, whose row counts follow the
    proposals of this image."""
    import caffe

    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))
    net = caffe.Net(str(ZF_TEST), caffe.TEST)
    scaled_random_weights(net._module, seed=13)
    blobs = zf_inputs(1.0)
    net.blobs["data"].reshape(*(blobs["data"].shape))
    net.blobs["im_info"].reshape(*(blobs["im_info"].shape))
    out = net.forward(data=blobs["data"], im_info=blobs["im_info"])
    rois = net.blobs["rois"].data.copy()
    assert rois.ndim == 2 and rois.shape[1] == 5 and 1 < rois.shape[0] <= 300
    assert out["cls_prob"].shape == (rois.shape[0], 21)
    assert net.blobs["bbox_pred"].data.shape == (rois.shape[0], 84)
    expected, _ = reference_proposals(
        net.blobs["rpn_cls_prob_reshape"].data, net.blobs["rpn_bbox_pred"].data, blobs["im_info"]
    )
    np.testing.assert_array_equal(rois, expected)


def test_faster_rcnn_with_builtin_proposal_matches_opencv(tmp_path):
    """ZF Faster R-CNN with the built-in Proposal, random weights, against OpenCV: the rois as
    box lists (OpenCV pads them to post_nms_topn rows of zeros), and each roi's class
    probabilities and box deltas. OpenCV ignores Dropout's scale_train, so its copy spells the
    fork's TEST-time factor (1 - dropout_ratio) out as a Power layer."""
    text, path = zf_with_builtin_proposal(tmp_path)
    # fc6/fc7 narrowed from 4096 to 256 outputs and 100 proposals kept: the same layers at a
    # size OpenCV runs in a second or two (it pads the rois to post_nms_topn rows and pools them
    # all)
    text = text.replace("num_output: 4096", "num_output: 256")
    text = text.replace("post_nms_topn: 300", "post_nms_topn: 100")
    path.write_text(text)
    net = Net.from_prototxt(str(path), phase="TEST")
    scaled_random_weights(net, seed=12)
    inputs = zf_inputs(0.0625)  # min_size * scale = 1 pixel: OpenCV does not filter by size
    with torch.no_grad():
        ours = run(net, **inputs)
    cv_text, dropouts = re.subn(
        r'type: "Dropout"(.*?)dropout_param \{.*?\}', r'type: "Power"\1power_param { scale: 0.5 }',
        text, flags=re.S,
    )  # fmt: skip
    assert dropouts == 2
    theirs = opencv_forward(cv_text, net, inputs, ["proposal", "cls_prob", "bbox_pred"])
    rois = net.blobs["rois"].numpy()
    kept = rois.shape[0]
    assert 1 < kept < 100
    cv_rois = theirs["proposal"]
    real = np.abs(cv_rois).sum(axis=1) > 0
    assert real.sum() == kept and not real[kept:].any()
    # each of our rois is one of OpenCV's: match them by box, then compare the per-roi outputs
    distance = np.abs(rois[:, None, :] - cv_rois[None, :kept, :]).max(axis=2)
    match = distance.argmin(axis=1)
    assert sorted(match) == list(range(kept))
    assert distance[np.arange(kept), match].max() <= 1e-3 * np.abs(rois).max()
    for name in ("cls_prob", "bbox_pred"):
        mine, cv = ours[name].numpy(), theirs[name].reshape(100, -1)[match]
        assert np.abs(mine - cv).max() <= 1e-3 * np.abs(cv).max(), name


# -- the forks' published nets build ------------------------------------------------------------


def fork_net_files() -> list[Path]:
    owners = ("rbgirshick__", "YuwenXiong__")
    return sorted(
        p
        for p in FORK_NETS.rglob("*.prototxt")
        if p.relative_to(FORK_NETS).parts[0].startswith(owners)
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", fork_net_files(), ids=lambda p: str(p.relative_to(FORK_NETS)))
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_region_detector_nets_build(path, phase, monkeypatch):
    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))
    net = Net.from_prototxt(str(path), phase=phase)
    kinds = {net.layer(name).type_name for name in net.layer_names}
    assert kinds & {"ROIPooling", "PSROIPooling"}
    for shape in net.blob_shapes.values():
        assert all(d >= 0 for d in shape)


@pytest.mark.parametrize(
    ("kind", "params", "channels"),
    [("ROIPooling", ROI_PARAMS, 3), ("PSROIPooling", psroi_params(), 18)],
)
def test_no_rois_give_an_empty_top_and_a_zero_gradient(kind, params, channels):
    # a proposal layer may keep no box: the pooled blob is then empty, and backward still runs
    net = Net(parse_net(pooling_net(kind, (1, channels, 5, 5), 1, params)), "TRAIN")
    x = torch.randn(1, channels, 5, 5, requires_grad=True)
    out = net(x=x, rois=torch.zeros(0, 5))["out"]
    assert out.shape[0] == 0 and out.shape[1:] == net.blob_shapes["out"][1:]
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
