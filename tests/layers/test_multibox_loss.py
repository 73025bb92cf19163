"""MultiBoxLoss against a NumPy transcription of the fork's C++ (weiliu89/caffe ssd:
multibox_loss_layer.cpp and bbox_util.cpp's GetGroundTruth, MatchBBox, FindMatches,
MineHardExamples, EncodeLocPrediction, EncodeConfPrediction, and the inner loss layers'
forward and backward), written as the fork's loops over maps and vectors.

OpenCV's importer has no MultiBoxLoss. Hand-made cases pin the matching and mining (which
priors get a gradient); random cases compare value and gradients for every option; float64
gradcheck checks that autograd's gradient is the one of the forward value.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.paths import ROOT
from tests.reference import gradcheck_net, parse_net

f32 = np.float32
FLT_MIN = float(np.finfo(np.float32).tiny)

DEFAULTS = dict(
    loc_loss_type="SMOOTH_L1", conf_loss_type="SOFTMAX", loc_weight=1.0, share_location=True,
    match_type="PER_PREDICTION", overlap_threshold=0.5, use_prior_for_matching=True,
    background_label_id=0, use_difficult_gt=True, neg_pos_ratio=3.0, neg_overlap=0.5,
    code_type="CORNER", encode_variance_in_target=False, map_object_to_agnostic=False,
    ignore_cross_boundary_bbox=False, bp_inside=False, mining_type="MAX_NEGATIVE",
    sample_size=64, normalization="VALID",
)  # fmt: skip


# ---- the reference: the fork's C++ as loops ------------------------------------------------


def size(b):
    if b[2] < b[0] or b[3] < b[1]:
        return f32(0)
    return f32(b[2] - b[0]) * f32(b[3] - b[1])


def jaccard(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return f32(0)
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw > 0 and ih > 0:
        inter = f32(iw * ih)
        return f32(inter / (size(a) + size(b) - inter))
    return f32(0)


def encode(p, v, b, code, in_target):
    if in_target:
        v = (f32(1),) * 4
    if code == "CORNER":
        return [f32((b[k] - p[k]) / v[k]) for k in range(4)]
    pw, ph = f32(p[2] - p[0]), f32(p[3] - p[1])
    if code == "CORNER_SIZE":
        s = (pw, ph, pw, ph)
        return [f32((b[k] - p[k]) / s[k] / v[k]) for k in range(4)]
    pcx, pcy = f32((p[0] + p[2]) / f32(2)), f32((p[1] + p[3]) / f32(2))
    bw, bh = f32(b[2] - b[0]), f32(b[3] - b[1])
    bcx, bcy = f32((b[0] + b[2]) / f32(2)), f32((b[1] + b[3]) / f32(2))
    return [
        f32((bcx - pcx) / pw / v[0]),
        f32((bcy - pcy) / ph / v[1]),
        f32(math.log(float(f32(bw / pw))) / float(v[2])),
        f32(math.log(float(f32(bh / ph))) / float(v[3])),
    ]


def decode(p, v, x, code, in_target):
    if in_target:
        v = (f32(1),) * 4
    if code == "CORNER":
        return [f32(p[k] + v[k] * x[k]) for k in range(4)]
    pw, ph = f32(p[2] - p[0]), f32(p[3] - p[1])
    if code == "CORNER_SIZE":
        s = (pw, ph, pw, ph)
        return [f32(p[k] + v[k] * x[k] * s[k]) for k in range(4)]
    pcx, pcy = f32((p[0] + p[2]) / f32(2)), f32((p[1] + p[3]) / f32(2))
    cx, cy = f32(v[0] * x[0] * pw + pcx), f32(v[1] * x[1] * ph + pcy)
    w = f32(math.exp(float(f32(v[2] * x[2]))) * float(pw))
    h = f32(math.exp(float(f32(v[3] * x[3]))) * float(ph))
    return [f32(cx - w / 2), f32(cy - h / 2), f32(cx + w / 2), f32(cy + h / 2)]


def match_bbox(gts, preds, label, o):
    """MatchBBox: gts are (box, label) pairs."""
    n = len(preds)
    index, best = [-1] * n, [f32(0)] * n
    gt_indices = [i for i, g in enumerate(gts) if label == -1 or g[1] == label]
    if not gt_indices:
        return index, best
    overlaps = {}
    for i in range(n):
        if o["ignore_cross_boundary_bbox"] and any(c < 0 or c > 1 for c in preds[i]):
            index[i] = -2
            continue
        for j, g in enumerate(gt_indices):
            ov = jaccard(preds[i], gts[g][0])
            if ov > 1e-6:
                best[i] = max(best[i], ov)
                overlaps.setdefault(i, {})[j] = ov
    pool = list(range(len(gt_indices)))
    while pool:
        max_i, max_j, max_o = -1, -1, -1.0
        for i in sorted(overlaps):
            if index[i] != -1:
                continue
            for j in pool:
                if j in overlaps[i] and overlaps[i][j] > max_o:
                    max_i, max_j, max_o = i, j, overlaps[i][j]
        if max_i == -1:
            break
        index[max_i], best[max_i] = gt_indices[max_j], max_o
        pool.remove(max_j)
    if o["match_type"] == "PER_PREDICTION":
        thr = f32(o["overlap_threshold"])
        for i in sorted(overlaps):
            if index[i] != -1:
                continue
            max_j, max_o = -1, -1.0
            for j in range(len(gt_indices)):
                if j in overlaps[i] and overlaps[i][j] >= thr and overlaps[i][j] > max_o:
                    max_j, max_o = j, overlaps[i][j]
            if max_j != -1:
                index[i], best[i] = gt_indices[max_j], max_o
    return index, best


def softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def sigmoid_ce(x, t):
    pos = 1.0 if x >= 0 else 0.0
    return -(x * (t - pos) - math.log(1 + math.exp(x - 2 * x * pos)))


def reference(loc, conf, priors, gt, **options):
    """(loss, d loss / d loc, d loss / d conf) as the fork computes them (top diff 1)."""
    o = dict(DEFAULTS, **options)
    num, C = loc.shape[0], o["num_classes"]
    P = priors.shape[-1] // 4
    share, bg = o["share_location"], o["background_label_id"]
    L = 1 if share else C
    mining = o["mining_type"]
    code, in_target = o["code_type"], o["encode_variance_in_target"]
    # GetGroundTruth
    all_gt = {}
    for row in gt.reshape(-1, 8):
        item = int(row[0])
        if item == -1:
            continue
        assert int(row[1]) != bg
        if not o["use_difficult_gt"] and bool(row[7]):
            continue
        all_gt.setdefault(item, []).append((tuple(f32(row[3:7])), int(row[1])))
    flat = priors.reshape(-1).astype(f32)
    boxes = [tuple(flat[4 * i : 4 * i + 4]) for i in range(P)]
    var = [tuple(flat[4 * (P + i) : 4 * (P + i) + 4]) for i in range(P)]
    lp = loc.reshape(num, P, L, 4)
    all_loc = [{(-1 if share else c): [lp[i, p, c] for p in range(P)] for c in range(L)}
               for i in range(num)]  # fmt: skip
    # FindMatches
    all_match, all_ovl = [], []
    for i in range(num):
        mi, mo = {}, {}
        if i in all_gt:
            gts = all_gt[i]
            if not o["use_prior_for_matching"]:
                for c in range(L):
                    label = -1 if share else c
                    if not share and label == bg:
                        continue
                    dec = [decode(boxes[p], var[p], all_loc[i][label][p], code, in_target)
                           for p in range(P)]  # fmt: skip
                    mi[label], mo[label] = match_bbox(gts, dec, label, o)
            else:
                idx, ov = match_bbox(gts, boxes, -1, o)
                if share:
                    mi[-1], mo[-1] = idx, ov
                else:
                    for c in range(L):
                        if c == bg:
                            continue
                        mi[c] = [m if m > -1 and gts[m][1] == c else -1 for m in idx]
                        mo[c] = ov
        all_match.append(mi)
        all_ovl.append(mo)
    # MineHardExamples
    num_matches = sum(m > -1 for mi in all_match for v in mi.values() for m in v)
    all_neg = [[] for _ in range(num)]
    num_negs = 0
    scores = conf.reshape(num, P, C)
    if mining != "NONE":
        enc = {}  # (i, label, j) -> (pred, target), EncodeLocPrediction
        for i in range(num):
            for label, idx in sorted(all_match[i].items()):
                for j, m in enumerate(idx):
                    if m > -1:
                        enc[i, label, j] = loc_pair(o, all_loc[i][label][j], all_gt[i][m][0],
                                                    boxes[j], var[j])  # fmt: skip
        for i in range(num):
            conf_loss = []
            for p in range(P):
                label = bg
                for idx in [v for _, v in sorted(all_match[i].items())]:
                    if idx[p] > -1:
                        label = all_gt[i][idx[p]][1]
                        break
                if o["conf_loss_type"] == "SOFTMAX":
                    prob = softmax(scores[i, p].astype(np.float64))[label]
                    conf_loss.append(-math.log(max(prob, FLT_MIN)))
                else:
                    conf_loss.append(sum(sigmoid_ce(scores[i, p, c], float(c == label))
                                         for c in range(C)))  # fmt: skip
            loc_loss = [0.0] * P
            if mining == "HARD_EXAMPLE":
                for (ii, _, j), (pr, tg) in enc.items():
                    if ii == i:
                        d = np.asarray(pr, np.float64) - np.asarray(tg, np.float64)
                        loc_loss[j] = float(sum(smooth(o, x) for x in d))
            loss = [a + b for a, b in zip(conf_loss, loc_loss)]
            sel = set()
            for label, idx in sorted(all_match[i].items()):
                ovl = all_ovl[i][label]
                if mining == "MAX_NEGATIVE":
                    cand = [(loss[m], m) for m in range(P) if idx[m] == -1
                            and ovl[m] < f32(o["neg_overlap"])]  # fmt: skip
                    num_pos = sum(m > -1 for m in idx)
                    n_sel = min(int(f32(num_pos) * f32(o["neg_pos_ratio"])), len(cand))
                else:
                    cand = [(loss[m], m) for m in range(P)]
                    n_sel = min(o["sample_size"], len(cand))
                cand.sort(key=lambda t: -t[0])
                sel.update(m for _, m in cand[:n_sel])
                for m in range(P):
                    if idx[m] > -1:
                        if mining == "HARD_EXAMPLE" and m not in sel:
                            idx[m] = -1
                            num_matches -= 1
                    elif idx[m] == -1 and m in sel:
                        all_neg[i].append(m)
                        num_negs += 1
    norm = normalizer(o["normalization"], num, P, num_matches)
    # localization loss and its gradient
    loss, dloc = 0.0, np.zeros((num, P, L, 4))
    for i in range(num):
        for label, idx in sorted(all_match[i].items()):
            for j, m in enumerate(idx):
                if m <= -1:
                    continue
                pr, tg = loc_pair(o, all_loc[i][label][j], all_gt[i][m][0], boxes[j], var[j])
                d = np.asarray(pr, np.float64) - np.asarray(tg, np.float64)
                loss += o["loc_weight"] * sum(smooth(o, x) for x in d) / norm
                c = 0 if share else label
                dloc[i, j, c] = o["loc_weight"] * np.array([dsmooth(o, x) for x in d]) / norm
    # confidence rows: (image, prior, target label)
    rows = []
    agnostic = o["map_object_to_agnostic"]
    if mining != "NONE":
        for i in range(num):
            if i not in all_gt:
                continue
            for _, idx in sorted(all_match[i].items()):
                for j, m in enumerate(idx):
                    if m > -1:
                        rows.append((i, j, bg + 1 if agnostic else all_gt[i][m][1]))
            rows += [(i, j, bg) for j in all_neg[i]]
    dconf = np.zeros((num, P, C))
    if o["conf_loss_type"] == "SOFTMAX":
        if mining == "NONE":
            target = np.full((num, P), bg)
            for i in range(num):
                for _, idx in sorted(all_match[i].items()):
                    for j, m in enumerate(idx):
                        if m > -1:
                            target[i, j] = bg + 1 if agnostic else all_gt[i][m][1]
            rows = [(i, j, target[i, j]) for i in range(num) for j in range(P)]
        for i, j, t in rows:
            prob = softmax(scores[i, j].astype(np.float64))
            loss += -math.log(max(prob[t], FLT_MIN)) / norm
            g = prob.copy()
            g[t] -= 1
            dconf[i, j] = g / norm
    else:
        if mining == "NONE":  # the fork's target indexing, as written
            t = np.full(num * P * C, float(bg))
            for i in range(num):
                for _, idx in sorted(all_match[i].items()):
                    for j, m in enumerate(idx):
                        if m > -1:
                            t[i * P + j * C + (bg + 1 if agnostic else all_gt[i][m][1])] = 1.0
            x = scores.reshape(-1).astype(np.float64)
            for k in range(len(x)):
                loss += sigmoid_ce(x[k], t[k]) / norm
            dconf = ((1 / (1 + np.exp(-x)) - t) / norm).reshape(num, P, C)
        else:
            for i, j, lab in rows:
                t = np.full(C, float(bg))
                t[lab] = 1.0
                x = scores[i, j].astype(np.float64)
                loss += sum(sigmoid_ce(x[c], t[c]) for c in range(C)) / norm
                dconf[i, j] = (1 / (1 + np.exp(-x)) - t) / norm
    return loss, dloc.reshape(loc.shape), dconf.reshape(conf.shape)


def loc_pair(o, pred, gt_box, prior, v):
    code, in_target = o["code_type"], o["encode_variance_in_target"]
    tg = encode(prior, v, gt_box, code, in_target)
    pr = [float(x) for x in pred]
    if o["bp_inside"]:
        box = prior
        if not o["use_prior_for_matching"]:
            box = decode(prior, v, pred, code, in_target)
        pr = [tg[k] if (box[k] < 0 or box[k] > 1) else pr[k] for k in range(4)]
    if in_target:
        pr = [pr[k] / float(v[k]) for k in range(4)]
        tg = [f32(tg[k] / v[k]) for k in range(4)]
    return pr, tg


def smooth(o, x):
    if o["loc_loss_type"] == "L2":
        return 0.5 * x * x
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def dsmooth(o, x):
    if o["loc_loss_type"] == "L2":
        return x
    return x if abs(x) < 1 else float(np.sign(x))


def normalizer(mode, num, P, matches):
    return max(1.0, float({"VALID": matches, "FULL": num * P, "BATCH_SIZE": num, "NONE": 1}[mode]))


# ---- the layer under test ---------------------------------------------------------------------


def net_text(n, P, C, num_gt, options, propagate=(True, True), share=True, raw=None):
    """The test net; ``raw`` replaces the multibox_loss_param fields made from ``options``."""
    o = dict(options)
    o.setdefault("num_classes", C)
    loss_param = f"loss_param {{ normalization: {o.pop('normalization')} }}" if (
        "normalization" in o) else ""  # fmt: skip
    fields = (
        " ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items())
        if raw is None
        else raw
    )
    L = 1 if share else C
    down = " ".join(f"propagate_down: {str(d).lower()}" for d in (*propagate, False, False))
    return f"""
layer {{ name: "in" type: "Input" top: "loc" top: "conf" top: "prior" top: "label"
  input_param {{ shape {{ dim: {n} dim: {P * 4 * L} }} shape {{ dim: {n} dim: {P * C} }}
                 shape {{ dim: 1 dim: 2 dim: {P * 4} }} shape {{ dim: 1 dim: 1 dim: {num_gt} dim: 8 }} }} }}
layer {{ name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" bottom: "prior"
  bottom: "label" top: "loss" {down} {loss_param}
  multibox_loss_param {{ {fields} }} }}
"""  # noqa: E501


def run(loc, conf, priors, gt, propagate=(True, True), dtype=torch.float32, **options):
    n, C = loc.shape[0], options.get("num_classes", 3)
    P = priors.shape[-1] // 4
    share = options.get("share_location", True)
    net = Net(parse_net(net_text(n, P, C, gt.shape[2], options, propagate, share)), "TRAIN")
    loc_t = torch.tensor(loc, dtype=dtype, requires_grad=True)
    conf_t = torch.tensor(conf, dtype=dtype, requires_grad=True)
    net(loc=loc_t, conf=conf_t, prior=torch.tensor(priors, dtype=dtype),
        label=torch.tensor(gt, dtype=dtype))  # fmt: skip
    net.loss.backward()
    gl = loc_t.grad.numpy() if loc_t.grad is not None else np.zeros(loc.shape)
    gc = conf_t.grad.numpy() if conf_t.grad is not None else np.zeros(conf.shape)
    return float(net.loss.detach()), gl, gc


def prior_blob(boxes, variances=(0.1, 0.1, 0.2, 0.2)):
    boxes = np.asarray(boxes, np.float32)
    var = np.tile(np.asarray(variances, np.float32), len(boxes))
    return np.concatenate([boxes.ravel(), var]).reshape(1, 2, -1)


def gt_blob(rows):
    return np.asarray(rows, np.float32).reshape(1, 1, -1, 8)


# Four quadrants and two central priors. gt A (label 1) overlaps prior 0 by 0.81, prior 4 by
# 0.547, prior 5 by 0.16; gt B (label 2) overlaps prior 3 by 0.81, prior 5 by 0.16, prior 4 by
# 0.023; priors 1 and 2 touch neither.
PRIORS = prior_blob([(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1),
                     (0.1, 0.1, 0.6, 0.6), (0.25, 0.25, 0.75, 0.75)])  # fmt: skip
A = [0, 1, 0, 0.05, 0.05, 0.5, 0.5, 0]
B = [0, 2, 0, 0.5, 0.5, 0.95, 0.95, 0]


def scores(n, P=6, C=3, seed=0, background=None):
    rng = np.random.default_rng(seed)
    conf = rng.normal(size=(n, P, C)).astype(np.float32)
    if background is not None:  # the background logit of each prior, to order the negatives
        conf[..., 0] = background
    return conf.reshape(n, P * C)


def locs(n, P=6, L=1, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, P * L * 4)) * scale).astype(np.float32)


def rows_with_gradient(g, n, P, width):
    return [sorted(np.nonzero(np.abs(g.reshape(n, P, width)[i]).sum(-1))[0].tolist())
            for i in range(n)]  # fmt: skip


def check(loc, conf, priors, gt, propagate=(True, True), rtol=2e-5, **options):
    ours = run(loc, conf, priors, gt, propagate, **options)
    o = dict(options, num_classes=options.get("num_classes", 3))
    ref = reference(loc, conf, priors, gt, **o)
    if not propagate[0]:  # the fork leaves the term out of the value too
        ref = (ref[0] - reference_loc_part(loc, conf, priors, gt, o), 0 * ref[1], ref[2])
    if not propagate[1]:
        ref = (ref[0] - reference_conf_part(loc, conf, priors, gt, o), ref[1], 0 * ref[2])
    np.testing.assert_allclose(ours[0], ref[0], rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(ours[1], ref[1], rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(ours[2], ref[2], rtol=rtol, atol=1e-6)
    return ours


def reference_loc_part(loc, conf, priors, gt, o):
    return (
        reference(loc, conf, priors, gt, **o)[0]
        - reference(loc, conf, priors, gt, **dict(o, loc_weight=0.0))[0]
    )


def reference_conf_part(loc, conf, priors, gt, o):
    return reference(loc, conf, priors, gt, **dict(o, loc_weight=0.0))[0]


# ---- hand-made cases: which priors match and which are mined --------------------------------


def test_bipartite_only_matches_each_gt_to_its_best_prior():
    loss, gl, gc = check(locs(1), scores(1), PRIORS, gt_blob([A, B]), match_type="BIPARTITE",
                         mining_type="NONE")  # fmt: skip
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 3]]
    assert rows_with_gradient(gc, 1, 6, 3) == [[0, 1, 2, 3, 4, 5]]  # no mining: every prior


def test_per_prediction_adds_priors_at_the_threshold():
    _, gl, _ = check(locs(1), scores(1), PRIORS, gt_blob([A, B]), mining_type="NONE")
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 3, 4]]  # prior 4: 0.547 >= 0.5
    _, gl, _ = check(locs(1), scores(1), PRIORS, gt_blob([A, B]), mining_type="NONE",
                     overlap_threshold=0.6)  # fmt: skip
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 3]]


def test_max_negative_mining_takes_the_hardest_eligible_negatives():
    # background logits: prior 2 and 5 score lowest, so they are the hardest negatives;
    # prior 4 (overlap 0.547 >= neg_overlap) is never a negative
    conf = scores(1, background=[0.0, 2.0, -3.0, 0.0, -5.0, -2.0])
    _, gl, gc = check(locs(1), conf, PRIORS, gt_blob([A, B]), match_type="BIPARTITE",
                      neg_pos_ratio=1.0)  # fmt: skip
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 3]]
    assert rows_with_gradient(gc, 1, 6, 3) == [[0, 2, 3, 5]]  # 2 positives, 2 negatives
    # ratio 3 asks for 6 negatives; only priors 1, 2 and 5 are eligible
    _, _, gc = check(locs(1), conf, PRIORS, gt_blob([A, B]), match_type="BIPARTITE")
    assert rows_with_gradient(gc, 1, 6, 3) == [[0, 1, 2, 3, 5]]
    # neg_overlap 0.6 makes prior 4 (unmatched, 0.547) eligible, and it is the hardest
    _, _, gc = check(locs(1), conf, PRIORS, gt_blob([A, B]), match_type="BIPARTITE",
                     neg_pos_ratio=0.5, neg_overlap=0.6)  # fmt: skip
    assert rows_with_gradient(gc, 1, 6, 3) == [[0, 3, 4]]


def test_difficult_ground_truth_is_dropped_unless_used():
    hard_b = B[:7] + [1]
    _, gl, _ = check(locs(1), scores(1), PRIORS, gt_blob([A, hard_b]), mining_type="NONE",
                     use_difficult_gt=False)  # fmt: skip
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 4]]
    _, gl, _ = check(locs(1), scores(1), PRIORS, gt_blob([A, hard_b]), mining_type="NONE")
    assert rows_with_gradient(gl, 1, 6, 4) == [[0, 3, 4]]


def test_an_image_without_boxes_gives_no_negatives_when_mining():
    gt = gt_blob([A, B])  # both boxes on image 0 of 2
    loss, gl, gc = check(locs(2), scores(2), PRIORS, gt)
    assert rows_with_gradient(gc, 2, 6, 3)[1] == []
    assert rows_with_gradient(gl, 2, 6, 4)[1] == []
    _, _, gc = check(locs(2), scores(2), PRIORS, gt, mining_type="NONE")
    assert rows_with_gradient(gc, 2, 6, 3)[1] == [0, 1, 2, 3, 4, 5]  # all background


def test_a_batch_without_boxes_costs_nothing_when_mining():
    empty = gt_blob([[-1] * 8])  # AnnotatedData's row for a batch with no box
    loss, gl, gc = check(locs(2), scores(2), PRIORS, empty)
    assert loss == 0 and not gl.any() and not gc.any()
    loss, _, gc = check(locs(2), scores(2), PRIORS, empty, mining_type="NONE")
    assert loss > 0 and np.abs(gc).sum(-1).all()


def test_hard_example_mining_keeps_the_selected_positives_only():
    conf = scores(1, background=[3.0, 2.0, -3.0, -4.0, -5.0, -2.0])
    _, gl, gc = check(locs(1), conf, PRIORS, gt_blob([A, B]), mining_type="HARD_EXAMPLE",
                      sample_size=3)  # fmt: skip
    selected = rows_with_gradient(gc, 1, 6, 3)[0]
    assert len(selected) == 3
    assert set(rows_with_gradient(gl, 1, 6, 4)[0]) <= {0, 3, 4} & set(selected)


def test_propagate_down_false_leaves_the_term_out():
    for down in ((True, False), (False, True)):
        check(locs(1), scores(1), PRIORS, gt_blob([A, B]), propagate=down)


# ---- every option against the reference, on random boxes --------------------------------------


def random_case(n=3, P=24, C=4, G=7, seed=0, L=1):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.1, 0.8, size=(P, 2))
    wh = rng.uniform(0.15, 0.5, size=(P, 2))
    priors = prior_blob(np.concatenate([xy, xy + wh], 1), (0.1, 0.1, 0.2, 0.2))
    gts = []
    for g in range(G):
        x0, y0 = rng.uniform(0, 0.6, 2)
        w, h = rng.uniform(0.2, 0.4, 2)
        item = g % (n - 1)  # the last image has no box
        gts.append([item, 1 + g % (C - 1), g, x0, y0, x0 + w, y0 + h, float(g % 3 == 0)])
    loc = (rng.normal(size=(n, P * L * 4)) * 0.3).astype(np.float32)
    conf = rng.normal(size=(n, P * C)).astype(np.float32)
    return loc, conf, priors, gt_blob(gts)


OPTION_CASES = [
    {},
    {"match_type": "BIPARTITE"},
    {"code_type": "CENTER_SIZE"},
    {"code_type": "CORNER_SIZE", "loc_loss_type": "L2"},
    {"code_type": "CENTER_SIZE", "encode_variance_in_target": True},
    {"use_difficult_gt": False, "neg_pos_ratio": 2.0, "neg_overlap": 0.3},
    {"mining_type": "NONE"},
    {"mining_type": "NONE", "conf_loss_type": "LOGISTIC"},
    {"conf_loss_type": "LOGISTIC"},
    {"mining_type": "HARD_EXAMPLE", "sample_size": 8, "code_type": "CENTER_SIZE"},
    {"use_prior_for_matching": False, "code_type": "CENTER_SIZE", "overlap_threshold": 0.3},
    {"bp_inside": True},
    {"bp_inside": True, "use_prior_for_matching": False, "overlap_threshold": 0.3},
    {"ignore_cross_boundary_bbox": True},
    {"loc_weight": 2.5, "normalization": "FULL"},
    {"normalization": "BATCH_SIZE", "background_label_id": 3},
    {"normalization": "NONE"},
    {"mining_type": "NONE", "share_location": False},
    {"mining_type": "NONE", "share_location": False, "use_prior_for_matching": False,
     "overlap_threshold": 0.3, "code_type": "CENTER_SIZE"},
    {"mining_type": "NONE", "num_classes": 2, "map_object_to_agnostic": True},
]  # fmt: skip


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join(map(str, o.values())))
def test_options_against_the_reference(options):
    C = options.get("num_classes", 4)
    L = 1 if options.get("share_location", True) else C
    loc, conf, priors, gt = random_case(C=C, L=L, seed=len(str(options)))
    if options.get("background_label_id") == 3:  # the labels must avoid the background
        gt[..., 1] = np.where(gt[..., 1] == 3, 2, gt[..., 1])
    check(loc, conf, priors, gt, **dict(options, num_classes=C))


def test_float64_gives_the_same_numbers():
    loc, conf, priors, gt = random_case()
    a = run(loc, conf, priors, gt, num_classes=4, code_type="CENTER_SIZE")
    b = run(loc, conf, priors, gt, dtype=torch.float64, num_classes=4, code_type="CENTER_SIZE")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    ["code_type: CENTER_SIZE", "mining_type: NONE conf_loss_type: LOGISTIC loc_loss_type: L2",
     "mining_type: HARD_EXAMPLE sample_size: 10 bp_inside: true"],
)  # fmt: skip
def test_gradcheck(options):
    loc, conf, priors, gt = random_case(n=2, P=10, C=3, G=4, seed=3)
    text = net_text(2, 10, 3, 4, {}, raw=f"num_classes: 3 {options}")
    gradcheck_net(
        text,
        inputs={"prior": torch.tensor(priors), "label": torch.tensor(gt)},
        check_inputs=["loc", "conf"],
        phase="TRAIN",
    )


# ---- configuration and data errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ("", "num_classes must be given"),
        ("num_classes: 3 background_label_id: 3", r"background_label_id 3 should be within"),
        ("num_classes: 3 share_location: false", "needs share_location: true"),
        ("num_classes: 3 do_neg_mining: false", "contradicts mining_type MAX_NEGATIVE"),
        ("num_classes: 3 map_object_to_agnostic: true", "needs num_classes 2"),
        ("num_classes: 3 nms_param { nms_threshold: 0.5 }", "nms_param is not supported"),
    ],
)
def test_configuration_errors(fields, message):
    text = net_text(1, 6, 3, 2, {}, raw=fields)
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(text), "TRAIN")
    assert "mbox_loss" in str(info.value) and "\n" not in str(info.value)


def test_shape_errors():
    text = net_text(1, 6, 3, 2, {}).replace("dim: 18", "dim: 17")
    with pytest.raises(CaffeAlexError, match="must match number of confidence predictions"):
        Net(parse_net(text), "TRAIN")


def test_background_label_in_the_data_is_an_error():
    with pytest.raises(CaffeAlexError, match=r"found background label 0 .*label row 1"):
        run(locs(1), scores(1), PRIORS, gt_blob([A, [0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0]]))
    with pytest.raises(CaffeAlexError, match=r"label 7 in label row 0 is not a class in \[0, 2\]"):
        run(locs(1), scores(1), PRIORS, gt_blob([[0, 7, 0, 0.1, 0.1, 0.2, 0.2, 0]]))


# ---- a training step through Net and Solver ----------------------------------------------------


def test_solver_steps_lower_the_loss_of_a_tiny_detector():
    """Two convolution heads on a 4 x 4 map (one prior per cell) trained by Caffe's SGD: the
    loss falls, and the layer's gradient reaches the heads' weights."""
    from caffe_alex.formats.prototxt import parse_solver_text
    from caffe_alex.solvers import Solver

    cells = [(x / 4, y / 4, (x + 1) / 4, (y + 1) / 4) for y in range(4) for x in range(4)]
    priors = torch.tensor(prior_blob(cells))
    label = torch.tensor(gt_blob([[0, 1, 0, 0.0, 0.0, 0.45, 0.5, 0],
                                  [1, 2, 0, 0.5, 0.5, 1.0, 0.95, 0]]))  # fmt: skip
    data = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    head = (
        'layer {{ name: "{0}" type: "Convolution" bottom: "data" top: "{0}" '
        "convolution_param {{ num_output: {1} kernel_size: 1 weight_filler {{ type: "
        '"gaussian" std: 0.1 }} }} }}\n'
        'layer {{ name: "{0}_flat" type: "Flatten" bottom: "{0}" top: "{0}_flat" }}\n'
    )
    net = (
        'layer { name: "in" type: "Input" top: "data" top: "prior" top: "label" input_param { '
        "shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 1 dim: 2 dim: 64 } "
        "shape { dim: 1 dim: 1 dim: 2 dim: 8 } } }\n"
        + head.format("loc", 4)
        + head.format("conf", 3)
        + 'layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc_flat" bottom: "conf_flat"'
        ' bottom: "prior" bottom: "label" top: "mbox_loss" propagate_down: true'
        " propagate_down: true propagate_down: false propagate_down: false"
        " multibox_loss_param { num_classes: 3 code_type: CENTER_SIZE overlap_threshold: 0.3 } }"
    )
    text = (f"net_param {{ {net} }}\nsolver_mode: CPU random_seed: 3 base_lr: 0.1 "
            'lr_policy: "fixed" momentum: 0.9 max_iter: 30 display: 0')  # fmt: skip
    batch = {"data": data, "prior": priors, "label": label}
    solver = Solver(parse_solver_text(text), feeds={"train": [batch] * 30, "test": []})
    net = solver.train_net
    first = float(net(**batch)["mbox_loss"].detach())
    before = net.params["loc"][0].detach().clone()
    solver.step(30)
    last = float(net(**batch)["mbox_loss"].detach())
    assert last < 0.5 * first
    assert not torch.equal(before, net.params["loc"][0])


# ---- the published MobileNet-SSD train net -----------------------------------------------------

TRAIN_NETS = [ROOT / "tests" / "fork_nets" / "chuanqi305__MobileNet-SSD" / "train.prototxt"]


@pytest.mark.parametrize("path", TRAIN_NETS, ids=lambda p: p.parent.name)
def test_fork_train_nets_build_in_every_phase_they_define(path):
    for phase in sorted(set(re.findall(r"phase:\s*(TRAIN|TEST)", path.read_text()))):
        shapes = {"data": (2, 3, 300, 300), "label": (1, 1, 1, 8)}  # the source is not here
        net = Net.from_prototxt(str(path), phase, input_shapes=shapes)
        assert "MultiBoxLoss" in net.layer_types
        priors = net.blob_shapes["mbox_priorbox"][2] // 4
        assert net.blob_shapes["mbox_loc"] == (2, priors * 4)
        assert net.blob_shapes["mbox_conf"] == (2, priors * 21)


def test_fork_train_nets_are_all_listed_here():
    nets = (ROOT / "tests" / "fork_nets").glob("*/**/*.prototxt")
    assert {p for p in nets if "MultiBoxLoss" in p.read_text()} <= set(TRAIN_NETS)


@pytest.mark.slow
def test_mobilenet_ssd_trains_from_convert_annoset_at_a_reduced_size(tmp_path):
    """MobileNet-SSD's train.prototxt as published (AnnotatedData with SSD's augmentation,
    PriorBox, Permute, MultiBoxLoss), reading a small LMDB made by convert-annoset, at 96 x 96
    and a batch of 2 instead of 300 x 300 and 24: Caffe's SGD takes its steps."""
    from caffe_alex.data.annoset import convert_annoset
    from caffe_alex.solvers import Solver
    from tests.data.voc import write_voc

    voc = write_voc(tmp_path / "voc", ext="jpg")
    db = str(tmp_path / "trainval_lmdb")
    convert_annoset(voc["root"], voc["list"], db, anno_type="detection",
                    label_map_file=voc["labelmap"], encoded=True, encode_type="jpg")  # fmt: skip
    text = TRAIN_NETS[0].read_text()
    changes = [('source: "trainval_lmdb/"', f'source: "{db}"'), ("batch_size: 24", "batch_size: 2"),
               ("height: 300", "height: 96"), ("width: 300", "width: 96")]  # fmt: skip
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "train.prototxt").write_text(text)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "train.prototxt"}" base_lr: 0.001 lr_policy: "fixed" momentum: 0.9 '
        "weight_decay: 0.00005 max_iter: 3 display: 1 random_seed: 5 solver_mode: CPU"
    )
    solver = Solver.from_file(str(tmp_path / "solver.prototxt"))
    net = solver.train_net
    assert net.blob_shapes["data"] == (2, 3, 96, 96)
    before = net.params["conv11_mbox_loc"][0].detach().clone()
    losses = []
    solver.callbacks.append(lambda it, loss, *_: losses.append(float(loss)))
    solver.step(3)
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    assert not torch.equal(before, net.params["conv11_mbox_loc"][0])
