"""SSD's bbox_util (weiliu89/caffe, branch ``ssd``, src/caffe/util/bbox_util.cpp) for the
MultiBoxLoss layer: box sizes, Jaccard overlaps, prior-box encoding and decoding, and the
matching of priors (or decoded predictions) to ground truth, on torch tensors, batched.

Boxes are (xmin, ymin, xmax, ymax) along the last axis. The fork keeps boxes in its
NormalizedBBox message, whose fields are floats, so every function here computes in float32
whatever the dtype of the blobs it came from. (The detection-output helpers of the inference
layers live in detection.py; these are the training side's.)
"""

from __future__ import annotations

import torch

from ..proto import caffe_pb2

CodeType = caffe_pb2.PriorBoxParameter
_MatchType = caffe_pb2.MultiBoxLossParameter


def box_sizes(boxes: torch.Tensor) -> torch.Tensor:
    """BBoxSize for normalized boxes: width * height, 0 where xmax < xmin or ymax < ymin."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JaccardOverlap of every box of ``a`` (..., A, 4) with every box of ``b`` (..., B, 4):
    (..., A, B). Boxes that do not touch, or whose intersection has no area, overlap 0."""
    a, b = a.float()[..., :, None, :], b.float()[..., None, :, :]
    apart = (
        (b[..., 0] > a[..., 2])
        | (b[..., 2] < a[..., 0])
        | (b[..., 1] > a[..., 3])
        | (b[..., 3] < a[..., 1])
    )
    iw = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    ih = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    inter = iw * ih
    union = box_sizes(a) + box_sizes(b) - inter
    touching = ~apart & (iw > 0) & (ih > 0)
    return torch.where(touching, inter / torch.where(touching, union, 1.0), 0.0)


def _centre_size(boxes: torch.Tensor):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2, w, h


def encode(priors, variances, boxes, code_type: int, variance_in_target: bool) -> torch.Tensor:
    """EncodeBBox of ``boxes`` (..., P, 4) against ``priors`` (P, 4) and their ``variances``:
    the regression targets, float32. With ``variance_in_target`` the variances are left out
    (the loss divides both sides by them later, as EncodeLocPrediction does)."""
    p, v, g = priors.float(), variances.float(), boxes.float()
    if variance_in_target:
        v = torch.ones_like(v)
    if code_type == CodeType.CORNER:
        return (g - p) / v
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    if code_type == CodeType.CORNER_SIZE:
        size = torch.stack([pw, ph, pw, ph], -1)
        return (g - p) / size / v
    if code_type != CodeType.CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    pcx, pcy, _, _ = _centre_size(p)
    gcx, gcy, gw, gh = _centre_size(g)
    # the C library's double log of a float ratio, divided in double, stored as a float
    lw = (torch.log((gw / pw).double()) / v[:, 2].double()).float()
    lh = (torch.log((gh / ph).double()) / v[:, 3].double()).float()
    return torch.stack([(gcx - pcx) / pw / v[:, 0], (gcy - pcy) / ph / v[:, 1], lw, lh], -1)


def decode(priors, variances, loc, code_type: int, variance_in_target: bool) -> torch.Tensor:
    """DecodeBBox (without clipping) of predictions ``loc`` (..., P, 4): boxes, float32."""
    p, v, x = priors.float(), variances.float(), loc.float()
    if variance_in_target:
        v = torch.ones_like(v)
    if code_type == CodeType.CORNER:
        return p + v * x
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    if code_type == CodeType.CORNER_SIZE:
        return p + v * x * torch.stack([pw, ph, pw, ph], -1)
    if code_type != CodeType.CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    pcx, pcy, _, _ = _centre_size(p)
    cx = v[:, 0] * x[..., 0] * pw + pcx
    cy = v[:, 1] * x[..., 1] * ph + pcy
    w = torch.exp((v[:, 2] * x[..., 2]).double()).float() * pw
    h = torch.exp((v[:, 3] * x[..., 3]).double()).float() * ph
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def crosses_boundary(boxes: torch.Tensor) -> torch.Tensor:
    """IsCrossBoundaryBBox: a coordinate outside [0, 1]."""
    return ((boxes < 0) | (boxes > 1)).any(-1)


def match(
    candidates: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    match_type: int,
    threshold: float,
    ignore_cross_boundary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MatchBBox for a batch: ``candidates`` (N, P, 4) or (P, 4) (priors, or decoded
    predictions), ``gt_boxes`` (N, G, 4) with ``gt_valid`` (N, G) saying which take part.

    Returns (match index (N, P), long: the gt index, -1 unmatched, -2 ignored as crossing the
    boundary; overlap (N, P), float32: the matched gt's overlap, else the best overlap above
    1e-6 with any gt, else 0). Bipartite first: the largest remaining overlap pairs a prior with
    a gt, ties to the lowest prior then the lowest gt, as the fork's loops find them; then, for
    PER_PREDICTION, each prior left takes the gt it overlaps most at or above ``threshold``."""
    n, g = gt_boxes.shape[0], gt_boxes.shape[1]
    if candidates.dim() == 2:
        candidates = candidates.expand(n, *candidates.shape)
    p = candidates.shape[1]
    overlaps = jaccard(candidates, gt_boxes)  # (N, P, G)
    ignored = (
        crosses_boundary(candidates.float())
        if ignore_cross_boundary
        else torch.zeros(n, p, dtype=torch.bool, device=candidates.device)
    )
    counted = (overlaps > 1e-6) & gt_valid[:, None, :] & ~ignored[:, :, None]
    index, best = _match_bipartite(overlaps, counted, ignored)
    if match_type == _MatchType.PER_PREDICTION and g:
        eligible = counted & (overlaps >= threshold)
        index, best = _match_per_prediction(overlaps, eligible, index, best)
    return index, best


def _match_bipartite(overlaps, counted, ignored):
    """match's bipartite rounds over the (N, P, G) ``overlaps`` of the ``counted`` pairs:
    (index, best overlap) per prior, -2 where ``ignored``."""
    n, p, g = counted.shape
    best = torch.where(counted, overlaps, 0.0).amax(-1) if g else overlaps.new_zeros(n, p)
    index = torch.full((n, p), -1, dtype=torch.long, device=overlaps.device)
    index = torch.where(ignored, -2, index)
    rows = torch.arange(n, device=overlaps.device)
    free = counted.clone()
    for _ in range(g):  # each round pairs one gt per image, while any pair is left
        scores = torch.where(free, overlaps, -1.0).reshape(n, p * g)
        flat = scores.argmax(1)  # the first largest: lowest prior, then lowest gt
        found = free.reshape(n, p * g).any(1)
        prior, gt = flat // g, flat % g
        value = scores[rows, flat]
        index[rows[found], prior[found]] = gt[found]
        best[rows[found], prior[found]] = value[found]
        free[rows[found], prior[found], :] = False
        free[rows[found], :, gt[found]] = False
    return index, best


def _match_per_prediction(overlaps, eligible, index, best):
    """match's PER_PREDICTION pass: each prior still unmatched takes its ``eligible`` gt of
    largest overlap."""
    scores = torch.where(eligible, overlaps, -1.0)
    value, gt = scores.max(-1)
    gt = scores.argmax(-1)  # first occurrence among equal overlaps
    take = (index == -1) & eligible.any(-1)
    return torch.where(take, gt, index), torch.where(take, value, best)
