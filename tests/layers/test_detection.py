"""SSD's "PriorBox" and "DetectionOutput" against NumPy transcriptions of the fork's C++
(prior_box_layer.cpp, detection_output_layer.cpp, bbox_util.cpp), OpenCV 4 per layer, and
the whole published SSD nets (tests/fork_nets) with random weights against OpenCV."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.paths import ROOT
from tests.reference import compare_with_opencv, opencv_forward, parse_net, relative_error

F32 = np.float32
FORK_NETS = ROOT / "tests" / "fork_nets"
SSD_NETS = [
    FORK_NETS / "chuanqi305__MobileNet-SSD" / "deploy.prototxt",
    FORK_NETS / "xzgz__caffe-ssd" / "models/VGGNet/VOC0712/SSD_300x300/deploy.prototxt",
    FORK_NETS / "chuanqi305__MobileNetv2-SSDLite" / "ssdlite/voc/deploy.prototxt",
]


# ---- PriorBox -------------------------------------------------------------------------------


def prior_net(params: str, feature=(1, 4, 5, 7), image=(1, 3, 40, 60)) -> str:
    dims = [" ".join(f"dim: {d}" for d in s) for s in (feature, image)]
    return f"""name: "prior_test"
layer {{ name: "f" type: "Input" top: "f" input_param {{ shape {{ {dims[0]} }} }} }}
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims[1]} }} }} }}
layer {{ name: "pb" type: "PriorBox" bottom: "f" bottom: "data" top: "pb"
  prior_box_param {{ {params} }} }}
"""


def fork_priors(feature, image, min_sizes, max_sizes=(), ratios=(), flip=True, clip=False,
                variance=(), img=(0, 0), step=(0.0, 0.0), offset=0.5):  # fmt: skip
    """PriorBoxLayer::Forward_cpu: float32 centres and sizes, corners in double, sizes
    truncated to int, aspect ratios deduplicated within 1e-6 (flip appends 1/ar)."""
    layer_h, layer_w = feature[2], feature[3]
    img_h, img_w = img if img[0] and img[1] else (image[2], image[3])
    step_h, step_w = step if step[0] and step[1] else (F32(img_h) / layer_h, F32(img_w) / layer_w)
    all_ratios = [1.0]
    for ar in ratios:
        if not any(abs(F32(ar) - r) < 1e-6 for r in all_ratios):
            all_ratios.append(F32(ar))
            if flip:
                all_ratios.append(F32(1.0 / F32(ar)))
    out = []
    for h in range(layer_h):
        for w in range(layer_w):
            cx = (F32(w) + F32(offset)) * F32(step_w)
            cy = (F32(h) + F32(offset)) * F32(step_h)
            for s, size in enumerate(min_sizes):
                size = int(size)
                boxes = [(F32(size), F32(size))]
                if max_sizes:
                    side = F32(math.sqrt(size * int(max_sizes[s])))
                    boxes.append((side, side))
                for ar in all_ratios:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    boxes.append((F32(size * np.sqrt(F32(ar))), F32(size / np.sqrt(F32(ar)))))
                for bw, bh in boxes:  # float centre and size, double corners
                    x, y, bw, bh = float(cx), float(cy), float(bw), float(bh)
                    out += [(x - bw / 2.0) / img_w, (y - bh / 2.0) / img_h,
                            (x + bw / 2.0) / img_w, (y + bh / 2.0) / img_h]  # fmt: skip
    coords = np.array(out, dtype=F32)
    if clip:
        coords = np.minimum(np.maximum(coords, 0), 1)
    var = np.array(variance or [0.1], dtype=F32)
    variances = np.tile(var, coords.size // len(var))
    return np.stack([coords, variances])[None]


PRIORS = [  # (prototxt fields, fork_priors keywords, feature shape, image shape)
    ("min_size: 30 max_size: 60 aspect_ratio: 2 variance: 0.1 variance: 0.1 variance: 0.2 "
     "variance: 0.2 step: 8", dict(min_sizes=[30], max_sizes=[60], ratios=[2],
     variance=[0.1, 0.1, 0.2, 0.2], step=(8, 8)), (1, 5, 38, 38), (1, 3, 300, 300)),
    ("min_size: 35.84 max_size: 76.8 aspect_ratio: 2 aspect_ratio: 3 clip: true",
     dict(min_sizes=[35.84], max_sizes=[76.8], ratios=[2, 3], clip=True), (2, 4, 5, 7),
     (2, 3, 40, 60)),
    ("min_size: 10 min_size: 20.5 max_size: 15 max_size: 33 aspect_ratio: 2 aspect_ratio: 2 "
     "aspect_ratio: 0.5 aspect_ratio: 1 aspect_ratio: 3 variance: 0.3",
     dict(min_sizes=[10, 20.5], max_sizes=[15, 33], ratios=[2, 2, 0.5, 1, 3], variance=[0.3]),
     (1, 2, 3, 4), (1, 3, 30, 50)),
    ("min_size: 16 aspect_ratio: 2 aspect_ratio: 3 flip: false img_size: 320 offset: 0.25",
     dict(min_sizes=[16], ratios=[2, 3], flip=False, img=(320, 320), offset=0.25),
     (1, 1, 4, 6), (1, 3, 17, 23)),
    ("min_size: 7 img_h: 90 img_w: 120 step_h: 9.5 step_w: 11 offset: 0",
     dict(min_sizes=[7], img=(90, 120), step=(9.5, 11), offset=0.0), (1, 3, 6, 5),
     (1, 3, 20, 20)),
    ("min_size: 60 max_size: 105 aspect_ratio: 2 aspect_ratio: 3 clip: true",
     dict(min_sizes=[60], max_sizes=[105], ratios=[2, 3], clip=True), (1, 8, 10, 10),
     (1, 3, 300, 300)),
]  # fmt: skip


@pytest.mark.parametrize("params,kwargs,feature,image", PRIORS)
def test_prior_box_matches_fork_transcription(params, kwargs, feature, image):
    net = Net(parse_net(prior_net(params, feature, image)))
    ours = net(f=torch.zeros(feature), data=torch.zeros(image))["pb"]
    expected = fork_priors(feature, image, **kwargs)
    assert tuple(ours.shape) == expected.shape == net.blob_shapes["pb"]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "params,feature,image",
    [
        ("min_size: 30 max_size: 60 aspect_ratio: 2 step: 8", (1, 4, 38, 38), (1, 3, 300, 300)),
        ("min_size: 60 max_size: 105 aspect_ratio: 2 aspect_ratio: 3", (2, 3, 10, 10),
         (2, 3, 300, 300)),
        ("min_size: 21 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 3 flip: false "
         "clip: true step_h: 7 step_w: 9 offset: 0.3", (1, 2, 5, 7), (1, 3, 40, 60)),
        ("min_size: 12 max_size: 40 clip: true variance: 0.1 variance: 0.1 variance: 0.2 "
         "variance: 0.2", (1, 2, 3, 2), (1, 3, 33, 20)),
    ],
)  # fmt: skip
def test_prior_box_matches_opencv(params, feature, image):
    # OpenCV reads one min_size, defaults clip to true and needs the variance spelt out
    if "clip" not in params:
        params += " clip: false"
    if "variance" not in params:
        params += " variance: 0.1"
    errors = compare_with_opencv(prior_net(params, feature, image), ["pb"], tol=1e-6)
    assert errors["pb"] <= 1e-6


def test_prior_box_follows_reshape_and_has_no_gradient():
    net = Net(parse_net(prior_net("min_size: 10 aspect_ratio: 2 variance: 0.2")))
    feature = torch.randn(1, 4, 3, 2, requires_grad=True)
    out = net(f=feature, data=torch.zeros(1, 3, 24, 16))["pb"]
    assert tuple(out.shape) == net.blob_shapes["pb"] == (1, 2, 3 * 2 * 3 * 4)
    np.testing.assert_allclose(
        out.numpy(), fork_priors((1, 4, 3, 2), (1, 3, 24, 16), [10], ratios=[2], variance=[0.2])
    )
    assert not out.requires_grad  # the fork's backward leaves its bottoms alone
    assert net(f=feature.double(), data=torch.zeros(1, 3, 24, 16))["pb"].dtype == torch.float64


@pytest.mark.parametrize(
    "params,message",
    [
        ("aspect_ratio: 2", "prior_box_param.min_size is required"),
        ("min_size: 0", "prior_box_param.min_size 0 must be positive"),
        ("min_size: 30 max_size: 30", "max_size 30 must be greater than min_size 30"),
        ("min_size: 30 min_size: 40 max_size: 50", "1 max_size for 2 min_size"),
        ("min_size: 3 variance: 0.1 variance: 0.2", "prior_box_param.variance has 2 values"),
        ("min_size: 3 variance: 0", "prior_box_param.variance 0 must be positive"),
        ("min_size: 3 img_size: 30 img_h: 30", "either img_size or img_h/img_w"),
        ("min_size: 3 img_h: 30", "prior_box_param.img_w must be positive"),
        ("min_size: 3 step: 8 step_w: 4", "either step or step_h/step_w"),
        ("min_size: 3 step: -1", "prior_box_param.step must be positive"),
        ("min_size: 3 width: 10 height: 10", "prior_box_param.width is not supported"),
        ("min_size: 3 offset_h: 0.5 offset_w: 0.5", "prior_box_param.offset_h is not supported"),
    ],
)  # fmt: skip
def test_prior_box_bad_config_rejected(params, message):
    with pytest.raises(CaffeAlexError, match=re.escape(message)):
        Net(parse_net(prior_net(params)))


def test_prior_box_without_min_size_names_file_line_and_layer(tmp_path):
    path = tmp_path / "ssd.prototxt"
    path.write_text(prior_net("aspect_ratio: 2 flip: true"))
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    assert str(info.value) == (
        f"{path}:4: layer 'pb' (PriorBox): prior_box_param.min_size is required (none given)"
    )
    assert (info.value.file, info.value.line, info.value.layer) == (str(path), 4, "pb")


# ---- DetectionOutput: a transcription of the fork's CPU forward ------------------------------


def fork_bbox_size(b) -> F32:
    if b[2] < b[0] or b[3] < b[1]:
        return F32(0)
    return F32(F32(b[2] - b[0]) * F32(b[3] - b[1]))


def fork_jaccard(b1, b2) -> F32:
    """JaccardOverlap of NormalizedBBox (normalized): IntersectBBox, then sizes."""
    if b2[0] > b1[2] or b2[2] < b1[0] or b2[1] > b1[3] or b2[3] < b1[1]:
        inter = np.zeros(4, F32)
    else:
        inter = np.array([max(b1[0], b2[0]), max(b1[1], b2[1]), min(b1[2], b2[2]),
                          min(b1[3], b2[3])], dtype=F32)  # fmt: skip
    iw, ih = F32(inter[2] - inter[0]), F32(inter[3] - inter[1])
    if iw > 0 and ih > 0:
        size = F32(iw * ih)
        return F32(size / F32(F32(fork_bbox_size(b1) + fork_bbox_size(b2)) - size))
    return F32(0)


def fork_decode(prior, var, code, encoded, loc):
    p, v, b = (np.asarray(a, F32) for a in (prior, var, loc))
    if encoded:
        v = np.ones(4, F32)
    if code == "CORNER":
        return p + v * b
    pw, ph = F32(p[2] - p[0]), F32(p[3] - p[1])
    if code == "CORNER_SIZE":
        return p + v * b * np.array([pw, ph, pw, ph], F32)
    pcx, pcy = F32((p[0] + p[2]) / F32(2)), F32((p[1] + p[3]) / F32(2))
    cx, cy = F32(v[0] * b[0] * pw + pcx), F32(v[1] * b[1] * ph + pcy)
    w, h = F32(np.exp(F32(v[2] * b[2])) * pw), F32(np.exp(F32(v[3] * b[3])) * ph)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], F32)


def fork_nms(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """ApplyNMSFast over NormalizedBBoxes: stable sort by score, then greedy."""
    pairs = [(s, i) for i, s in enumerate(scores) if s > score_threshold]
    pairs.sort(key=lambda pair: -pair[0])  # Python's sort is stable, as std::stable_sort
    if top_k > -1:
        pairs = pairs[:top_k]
    kept, adaptive = [], F32(nms_threshold)
    for _, idx in pairs:
        keep = all(fork_jaccard(boxes[idx], boxes[k]) <= adaptive for k in kept)
        if keep:
            kept.append(idx)
            if eta < 1 and adaptive > 0.5:
                adaptive = F32(adaptive * F32(eta))
    return kept


def fork_detection_output(loc, conf, prior, num_classes, share_location=True, background=0,
                          nms_threshold=0.3, top_k=-1, eta=1.0, code="CORNER", encoded=False,
                          keep_top_k=-1, confidence=None):  # fmt: skip
    num = loc.shape[0]
    priors = prior.shape[2] // 4
    loc_classes = 1 if share_location else num_classes
    loc = loc.reshape(num, priors, loc_classes, 4)
    conf = conf.reshape(num, priors, num_classes)
    coords, variances = prior.reshape(2, priors, 4)
    threshold = -np.finfo(F32).max if confidence is None else confidence
    rows, num_kept = [], 0
    for i in range(num):
        decoded = {}
        for c in range(loc_classes):
            label = -1 if share_location else c
            decoded[label] = [
                fork_decode(coords[p], variances[p], code, encoded, loc[i, p, c])
                for p in range(priors)
            ]
        indices = {}
        for c in range(num_classes):
            if c == background:
                continue
            boxes = decoded[-1 if share_location else c]
            indices[c] = fork_nms(boxes, conf[i, :, c], threshold, nms_threshold, eta, top_k)
        num_det = sum(len(v) for v in indices.values())
        if -1 < keep_top_k < num_det:
            pairs = [(conf[i, idx, c], c, idx) for c in sorted(indices) for idx in indices[c]]
            pairs.sort(key=lambda t: -t[0])
            indices = {}
            for _, c, idx in pairs[:keep_top_k]:
                indices.setdefault(c, []).append(idx)
            num_kept += keep_top_k
        else:
            num_kept += num_det
        for c in sorted(indices):
            boxes = decoded[-1 if share_location else c]
            for idx in indices[c]:
                rows.append([i, c, conf[i, idx, c], *boxes[idx]])
    if num_kept == 0:
        return np.array([[i] + [-1] * 6 for i in range(num)], F32)[None, None]
    return np.array(rows, F32)[None, None]


def detection_inputs(num, priors, classes, share_location=True, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.1, 0.9, (priors, 2))
    size = rng.uniform(0.05, 0.5, (priors, 2))
    coords = np.concatenate([centre - size / 2, centre + size / 2], 1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], (priors, 1))
    prior = np.stack([coords.reshape(-1), variances.reshape(-1)])[None].astype(F32)
    loc_classes = 1 if share_location else classes
    loc = (rng.standard_normal((num, priors * loc_classes * 4)) * spread).astype(F32)
    logits = rng.standard_normal((num, priors, classes)) * 2
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(num, -1).astype(F32), prior


def detection_net(num, priors, classes, params, share_location=True) -> str:
    loc_classes = 1 if share_location else classes
    return f"""name: "detection_test"
layer {{ name: "in" type: "Input" top: "loc" top: "conf" top: "prior"
  input_param {{ shape {{ dim: {num} dim: {priors * loc_classes * 4} }}
    shape {{ dim: {num} dim: {priors * classes} }} shape {{ dim: 1 dim: 2 dim: {priors * 4} }} }} }}
layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior"
  top: "det" detection_output_param {{ num_classes: {classes} {params} }} }}
"""


def run_detection(text, loc, conf, prior) -> torch.Tensor:
    net = Net(parse_net(text))
    feed = {"loc": loc, "conf": conf, "prior": prior}
    out = net(**{k: torch.from_numpy(v) for k, v in feed.items()})["det"]
    bound = net.blob_shapes["det"]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and out.shape[2] <= bound[2]
    return out


CASES = [  # (fields, fork_detection_output keywords, share_location, num, priors, classes)
    ("nms_param { nms_threshold: 0.45 top_k: 20 } code_type: CENTER_SIZE keep_top_k: 15 "
     "confidence_threshold: 0.2", dict(nms_threshold=0.45, top_k=20, code="CENTER_SIZE",
     keep_top_k=15, confidence=0.2), True, 2, 60, 5),
    ("nms_param { nms_threshold: 0.3 } confidence_threshold: 0.1",
     dict(nms_threshold=0.3, confidence=0.1), True, 1, 80, 4),
    ("nms_param { nms_threshold: 0.5 top_k: 30 eta: 0.8 } code_type: CORNER_SIZE "
     "background_label_id: 2 keep_top_k: 40", dict(nms_threshold=0.5, top_k=30, eta=0.8,
     code="CORNER_SIZE", background=2, keep_top_k=40), True, 2, 40, 4),
    ("nms_param { nms_threshold: 0.7 eta: 0.9 } code_type: CENTER_SIZE "
     "variance_encoded_in_target: true share_location: false background_label_id: -1 "
     "confidence_threshold: 0.3", dict(nms_threshold=0.7, eta=0.9, code="CENTER_SIZE",
     encoded=True, share_location=False, background=-1, confidence=0.3), False, 2, 30, 3),
    ("nms_param { nms_threshold: 0.4 top_k: 5 } variance_encoded_in_target: true "
     "keep_top_k: 0 confidence_threshold: 0.05", dict(nms_threshold=0.4, top_k=5, encoded=True,
     keep_top_k=0, confidence=0.05), True, 2, 20, 3),
    ("nms_param { nms_threshold: 0.45 } code_type: CENTER_SIZE confidence_threshold: 0.999",
     dict(nms_threshold=0.45, code="CENTER_SIZE", confidence=0.999), True, 3, 20, 3),
    ("nms_param { nms_threshold: 0 } keep_top_k: 7 confidence_threshold: 0.25 "
     "share_location: false", dict(nms_threshold=0.0, keep_top_k=7, confidence=0.25,
     share_location=False), False, 1, 50, 3),
    ("nms_param { nms_threshold: 0.45 top_k: 0 } code_type: CENTER_SIZE",
     dict(nms_threshold=0.45, top_k=0, code="CENTER_SIZE"), True, 2, 10, 2),
]  # fmt: skip


@pytest.mark.parametrize("params,kwargs,share,num,priors,classes", CASES)
def test_detection_output_matches_fork_transcription(params, kwargs, share, num, priors, classes):
    loc, conf, prior = detection_inputs(num, priors, classes, share, seed=priors)
    ours = run_detection(detection_net(num, priors, classes, params, share), loc, conf, prior)
    expected = fork_detection_output(loc, conf, prior, classes, **kwargs)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-6)


def test_detection_output_keeps_something_in_most_cases():
    # the cases above must exercise NMS, keep_top_k and the placeholder rows, not only one
    kept, placeholders = [], []
    for _, kwargs, share, num, priors, classes in CASES:
        loc, conf, prior = detection_inputs(num, priors, classes, share, seed=priors)
        rows = fork_detection_output(loc, conf, prior, classes, **kwargs)[0, 0]
        kept.append(len(rows))
        placeholders.append(bool(np.all(rows[:, 1:] == -1)))
    assert kept[0] == 30 and kept[6] == 7  # cut to keep_top_k across 2 images, 1 image
    assert sum(k > 50 for k in kept) >= 3  # NMS on many boxes
    assert placeholders == [False] * 4 + [True, True, False, True]


def test_detection_output_eta_and_top_k_change_the_result():
    loc, conf, prior = detection_inputs(1, 80, 3, seed=4)
    base = "nms_param { nms_threshold: 0.9 } confidence_threshold: 0.05"
    plain = run_detection(detection_net(1, 80, 3, base), loc, conf, prior)
    adaptive = run_detection(
        detection_net(1, 80, 3, base.replace("0.9 }", "0.9 eta: 0.7 }")), loc, conf, prior
    )
    assert adaptive.shape[2] < plain.shape[2]
    expected = fork_detection_output(loc, conf, prior, 3, nms_threshold=0.9, eta=0.7,
                                     confidence=0.05)  # fmt: skip
    np.testing.assert_allclose(adaptive.numpy(), expected, atol=2e-6)


def test_detection_output_rows_order_and_placeholder():
    loc, conf, prior = detection_inputs(2, 30, 4, seed=1)
    out = run_detection(
        detection_net(2, 30, 4, "nms_param { nms_threshold: 0.5 } confidence_threshold: 0.3"),
        loc, conf, prior,
    )[0, 0].numpy()  # fmt: skip
    keys = [(row[0], row[1], -row[2]) for row in out]
    assert keys == sorted(keys) and {0, 1} == set(out[:, 0]) and 0 not in out[:, 1]
    none = run_detection(detection_net(2, 30, 4, "confidence_threshold: 1"), loc, conf, prior)
    expected = [[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]]
    np.testing.assert_array_equal(none[0, 0].numpy(), expected)


def test_detection_output_upper_bound_shape():
    shapes = {
        "nms_param { top_k: 20 } keep_top_k: 15": (1, 1, 30, 7),
        "nms_param { top_k: 20 }": (1, 1, 2 * 3 * 20, 7),
        "": (1, 1, 2 * 3 * 50, 7),
        "background_label_id: -1 keep_top_k: 500": (1, 1, 2 * 4 * 50, 7),
        "keep_top_k: 0": (1, 1, 2, 7),
    }
    for params, shape in shapes.items():
        assert Net(parse_net(detection_net(2, 50, 4, params))).blob_shapes["det"] == shape


def test_detection_output_refuses_backward_and_accepts_an_image_bottom():
    loc, conf, prior = detection_inputs(1, 20, 3, seed=2)
    text = (
        detection_net(1, 20, 3, "confidence_threshold: 0.2")
        .replace('bottom: "prior"\n', 'bottom: "prior" bottom: "image"\n')
        .replace('top: "prior"\n', 'top: "prior" top: "image"\n')
        .replace("dim: 80 } }", "dim: 80 } shape { dim: 1 dim: 3 dim: 8 dim: 8 } }")
    )
    net = Net(parse_net(text))
    loc_t = torch.from_numpy(loc).requires_grad_()
    feed = dict(conf=torch.from_numpy(conf), prior=torch.from_numpy(prior),
                image=torch.zeros(1, 3, 8, 8))  # fmt: skip
    out = net(loc=loc_t, **feed)["det"]
    expected = fork_detection_output(loc, conf, prior, 3, confidence=0.2)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=2e-6)
    with pytest.raises(CaffeAlexError, match="no backward for DetectionOutput") as info:
        out.sum().backward()
    assert info.value.layer == "det"


@pytest.mark.parametrize(
    "params,message",
    [
        ("", "detection_output_param.num_classes is required"),
        ("num_classes: 3 nms_param { nms_threshold: -0.1 }", "nms_threshold -0.1 must be >= 0"),
        ("num_classes: 3 nms_param { eta: 0 }", "eta 0 must be in (0, 1]"),
        ("num_classes: 3 nms_param { eta: 1.5 }", "eta 1.5 must be in (0, 1]"),
        ("num_classes: 3 visualize: true", "visualize: true is not supported"),
        ("num_classes: 4", "conf [1, 60] must have 80 channels: 20 priors x 4 classes"),
        ("num_classes: 3 share_location: false", "loc [1, 80] must have 240 channels"),
        ("num_classes: 3 normalized_bbox: false", "normalized_bbox is not supported"),
    ],
)
def test_detection_output_bad_config_rejected(params, message):
    text = detection_net(1, 20, 3, "").replace("num_classes: 3 ", params + " ")
    with pytest.raises(CaffeAlexError, match=re.escape(message)):
        Net(parse_net(text))


def test_save_output_param_is_accepted_and_writes_nothing(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = (
        'save_output_param { output_directory: "out" output_name_prefix: "comp4_" '
        'output_format: "VOC" label_map_file: "labels.prototxt" name_size_file: "sizes.txt" '
        "num_test_image: 10 } confidence_threshold: 0.2"
    )
    loc, conf, prior = detection_inputs(1, 20, 3, seed=2)
    with caplog.at_level("WARNING", logger="caffe_alex"):
        out = run_detection(detection_net(1, 20, 3, params), loc, conf, prior)
    assert "save_output_param is ignored" in caplog.text
    expected = fork_detection_output(loc, conf, prior, 3, confidence=0.2)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)
    assert list(tmp_path.iterdir()) == []


# ---- DetectionOutput against OpenCV ---------------------------------------------------------


def kept_rows(rows: np.ndarray) -> np.ndarray:
    """Detections without OpenCV's zero padding, sorted by (image, label, -score)."""
    rows = np.asarray(rows).reshape(-1, 7)
    rows = rows[np.any(rows != 0, axis=1)]
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


@pytest.mark.parametrize(
    "params,share,classes",
    [
        ("nms_param { nms_threshold: 0.45 top_k: 20 } code_type: CENTER_SIZE keep_top_k: 15 "
         "confidence_threshold: 0.2", True, 5),
        ("nms_param { nms_threshold: 0.3 top_k: 40 } code_type: CORNER keep_top_k: 100 "
         "confidence_threshold: 0.1", True, 4),
        ("nms_param { nms_threshold: 0.5 top_k: 25 } code_type: CORNER keep_top_k: 50 "
         "confidence_threshold: 0.15 background_label_id: 2", True, 4),
        ("nms_param { nms_threshold: 0.45 top_k: 25 } code_type: CENTER_SIZE keep_top_k: 60 "
         "confidence_threshold: 0.2", False, 3),
    ],
)  # fmt: skip
def test_detection_output_matches_opencv(params, share, classes):
    # OpenCV reads these fields from the prototxt only when spelt out (and knows no
    # CORNER_SIZE)
    params += f" share_location: {str(share).lower()}"
    if "background_label_id" not in params:
        params += " background_label_id: 0"
    loc, conf, prior = detection_inputs(2, 60, classes, share, seed=classes)
    text = detection_net(2, 60, classes, params, share)
    ours = run_detection(text, loc, conf, prior)
    net = Net(parse_net(text))
    theirs = opencv_forward(text, net, {"loc": loc, "conf": conf, "prior": prior}, ["det"])
    ours_rows, their_rows = kept_rows(ours.numpy()), kept_rows(theirs["det"])
    assert len(ours_rows) == ours.shape[2] > 10
    assert ours_rows.shape == their_rows.shape
    np.testing.assert_allclose(ours_rows, their_rows, rtol=0, atol=2e-6)


# ---- the published SSD nets -----------------------------------------------------------------


def _phases(path: Path) -> list[str]:
    text = path.read_text()
    named = set(re.findall(r"phase:\s*(TRAIN|TEST)", text))
    return sorted(named | {"TEST"})


@pytest.mark.parametrize("path", SSD_NETS, ids=lambda p: p.parent.name)
def test_fork_nets_build_in_every_phase(path):
    for phase in _phases(path):
        net = Net.from_prototxt(str(path), phase)
        types = set(net.layer_types)
        assert {"PriorBox", "Permute"} <= types
        if phase == "TEST":
            assert "DetectionOutput" in types and net.output_names == ["detection_out"]
            assert net.blob_shapes["mbox_priorbox"][2] == net.blob_shapes["mbox_loc"][1]


def test_fork_nets_are_all_listed_here():
    listed = {p.resolve() for p in SSD_NETS}
    ours = {p.resolve() for p in FORK_NETS.glob("*/**/*.prototxt") if _is_ssd(p)}
    assert ours <= listed


def _is_ssd(path: Path) -> bool:
    # deploy nets; the train nets (MultiBoxLoss) are built in tests/layers/test_multibox_loss.py
    text = path.read_text()
    return "PriorBox" in text and "MultiBoxLoss" not in text


def he_weights(net: Net, seed: int) -> None:
    """Weights that keep unit-scale activations through a deep net: He-scaled convolutions,
    BatchNorm as identity, Scale near 1, Normalize's scale 20 as SSD's filler gives it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer(name).type_name
            if kind == "Convolution":
                fan_in = math.prod(blobs[0].shape[1:])
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * math.sqrt(2 / fan_in))
                for bias in blobs[1:]:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
            elif kind == "BatchNorm":
                blobs[0].zero_(), blobs[1].fill_(1), blobs[2].fill_(1)
            elif kind == "Scale":
                blobs[0].copy_(1 + 0.1 * torch.randn(blobs[0].shape, generator=gen))
                for bias in blobs[1:]:
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            elif kind == "Normalize":
                blobs[0].fill_(20)


def opencv_from_files(folder: Path, net: Net, data: np.ndarray, outputs: list[str]):
    """OpenCV on folder/deploy.prototxt and a caffemodel of the net's weights written by
    caffe_alex."""
    import cv2

    net.save_weights(folder / "random.caffemodel")
    cv_net = cv2.dnn.readNetFromCaffe(
        str(folder / "deploy.prototxt"), str(folder / "random.caffemodel")
    )
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setInput(data, "data")
    return dict(zip(outputs, (np.asarray(r) for r in cv_net.forward(outputs))))


def compare_whole_net(folder, path: Path, threshold: float, size: int, minimum: int, seed=0):
    text = path.read_text()
    text, n = re.subn(r"confidence_threshold: [0-9.]+", f"confidence_threshold: {threshold}", text)
    assert n == 1
    text = re.sub(r"dim: 300\n", f"dim: {size}\n", text)
    (folder / "deploy.prototxt").write_text(text)
    net = Net.from_prototxt(str(folder / "deploy.prototxt"))
    he_weights(net, seed)
    data = np.random.default_rng(seed).uniform(-1, 1, (1, 3, size, size)).astype(F32)
    with torch.no_grad():
        ours = net(data=torch.from_numpy(data))["detection_out"].numpy()
    blobs = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    theirs = opencv_from_files(folder, net, data, [*blobs, "detection_out"])
    for name in blobs:
        assert relative_error(net.blobs[name].numpy(), theirs[name]) <= 1e-3, name
    ours_rows, their_rows = kept_rows(ours), kept_rows(theirs["detection_out"])
    assert len(ours_rows) == ours.shape[2] >= minimum
    assert ours_rows.shape == their_rows.shape
    scale = max(np.abs(their_rows).max(), 1.0)
    np.testing.assert_allclose(ours_rows, their_rows, rtol=0, atol=1e-3 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("threshold,minimum", [(0.25, 50), (0.15, 100)])
def test_mobilenet_ssd_matches_opencv(tmp_path, threshold, minimum):
    # 0.25 (the file's own) keeps ~70 boxes after NMS; 0.15 keeps more than keep_top_k (100)
    compare_whole_net(tmp_path, SSD_NETS[0], threshold=threshold, size=300, minimum=minimum)


@pytest.mark.slow
def test_mobilenet_v2_ssdlite_matches_opencv(tmp_path):
    # ReLU6 and depthwise (grouped) convolutions from the mobile family, and a layer name the
    # file uses twice, end to end. At 300x300 the last head's maps are 1x1, where OpenCV's
    # depthwise convolution is wrong (docs/forks.md); at 544 the smallest map is 2x2.
    compare_whole_net(tmp_path, SSD_NETS[2], threshold=0.2, size=544, minimum=50)


@pytest.mark.slow
def test_vgg_ssd300_matches_opencv(tmp_path):
    # the smallest input whose conv9_2 still has a cell keeps the test short
    compare_whole_net(tmp_path, SSD_NETS[1], threshold=0.1, size=260, minimum=200)
