"""MultiBoxLoss's matching side (weiliu89/caffe, branch ``ssd``, bbox_util.cpp's
GetGroundTruth, FindMatches and MineHardExamples as the layer calls them): which priors the
loss counts as positives, against which ground truth box, and which negatives it mines.

The layer (multibox_loss.py) holds one ``Matcher`` and assembles the losses from what it
returns; the box arithmetic is bbox.py's.
"""

from __future__ import annotations

import torch

from ..proto import caffe_pb2
from . import bbox

_P = caffe_pb2.MultiBoxLossParameter


class Truth:
    """The usable ground truth, per image: boxes (N, G, 4) float32, labels (N, G) long,
    valid (N, G) bool, has (N,) bool (an image with at least one box)."""

    def __init__(self, boxes, labels, valid, device):
        self.boxes, self.labels = boxes.to(device), labels.to(device)
        self.valid = valid.to(device)
        self.has = self.valid.any(1)


class Matcher:
    """The matching and mining of one MultiBoxLoss layer, ``p`` its multibox_loss_param
    (already checked)."""

    def __init__(self, p):
        self.p = p
        self.classes = int(p.num_classes)
        self.loc_classes = 1 if p.share_location else self.classes
        self.background = int(p.background_label_id)
        self.mining = p.mining_type

    def ground_truth(self, label: torch.Tensor, n: int, device, bad) -> Truth:
        """GetGroundTruth: rows with image -1 are padding; difficult boxes dropped unless
        use_difficult_gt; boxes grouped by image in row order. ``bad(message)`` makes the
        error for a row the fork would stop on."""
        rows = label.detach().reshape(-1, 8).to("cpu", torch.float32)
        image = torch.trunc(rows[:, 0])
        keep = image != -1
        cls = torch.trunc(rows[:, 1])
        if bool((keep & (cls == self.background)).any()):
            row = int(torch.nonzero(keep & (cls == self.background))[0, 0])
            raise bad(f"found background label {self.background} in the dataset (label row {row})")
        if not self.p.use_difficult_gt:
            keep &= rows[:, 7] == 0
        keep &= (image >= 0) & (image < n)  # the fork looks images 0..N-1 up by id
        if not (self.p.map_object_to_agnostic and self.mining == _P.NONE):
            self._check_classes(rows, keep & ((cls < 0) | (cls >= self.classes)), bad)
        return _grouped(rows, keep, image[keep].long(), n, device)

    def _check_classes(self, rows, wrong, bad) -> None:
        if bool(wrong.any()):
            row = int(torch.nonzero(wrong)[0, 0])
            raise bad(
                f"label {rows[row, 1].item():g} in label row {row} is not a class in "
                f"[0, {self.classes - 1}] (num_classes {self.classes})"
            )

    def find_matches(self, loc, priors, variances, truth: Truth):
        """FindMatches: (match index (N, L, P), overlap (N, L, P)) with L loc classes."""
        if self.p.use_prior_for_matching:
            return self._match_priors(priors, truth)
        indices, overlaps = [], []
        for c in range(self.loc_classes):
            index, overlap = self._match_decoded(loc[:, :, c], priors, variances, truth, c)
            indices.append(index)
            overlaps.append(overlap)
        return torch.stack(indices, 1), torch.stack(overlaps, 1)

    def _match_priors(self, priors, truth: Truth):
        p = self.p
        index, overlap = bbox.match(
            priors, truth.boxes, truth.valid, p.match_type, p.overlap_threshold,
            p.ignore_cross_boundary_bbox,
        )  # fmt: skip
        if p.share_location:
            return index[:, None], overlap[:, None]
        # each class keeps the matches to its own boxes; the background none
        gt_label = truth.labels.gather(1, index.clamp(min=0))
        per_class = [
            torch.where((index >= 0) & (gt_label == c) & (c != self.background), index, -1)
            for c in range(self.loc_classes)
        ]
        return torch.stack(per_class, 1), overlap[:, None].expand(-1, self.loc_classes, -1)

    def _match_decoded(self, loc, priors, variances, truth: Truth, c: int):
        """Loc class ``c``'s matches of its decoded predictions ``loc`` (N, P, 4)."""
        p = self.p
        decoded = bbox.decode(priors, variances, loc, p.code_type, p.encode_variance_in_target)
        valid = truth.valid if p.share_location else truth.valid & (truth.labels == c)
        if not p.share_location and c == self.background:
            valid = torch.zeros_like(valid)
        index, overlap = bbox.match(
            decoded, truth.boxes, valid, p.match_type, p.overlap_threshold,
            p.ignore_cross_boundary_bbox,
        )  # fmt: skip
        if not p.share_location and c == self.background:
            index = torch.full_like(index, -1)  # the fork keeps no entry for it
        return index, overlap

    def mine(self, conf_loss, index, overlap, truth: Truth, loc_per_prior):
        """MineHardExamples (share_location: one loc class), ranking by ``conf_loss`` (N, P),
        float32, plus ``loc_per_prior`` for HARD_EXAMPLE: the negatives (N, P) and the
        positives that stay (N, P)."""
        p = self.p
        index, overlap = index[:, 0], overlap[:, 0]
        positive = index >= 0
        loss = conf_loss
        if self.mining == _P.MAX_NEGATIVE:
            eligible = (index == -1) & (overlap < p.neg_overlap)
            # int(num_pos * neg_pos_ratio), the product in float32
            wanted = (positive.sum(1).float() * p.neg_pos_ratio).trunc().long()
        else:
            loss = loss + loc_per_prior
            eligible = torch.ones_like(positive)
            wanted = torch.full_like(positive.sum(1), int(p.sample_size))
        eligible &= truth.has[:, None]  # an image without boxes has no entry to mine from
        selected = _largest(loss, eligible, wanted)
        if self.mining == _P.HARD_EXAMPLE:
            positive = positive & selected
        return selected & (index == -1), positive


def _largest(loss, eligible, wanted):
    """Per image, the ``wanted`` eligible priors of largest ``loss`` (ties to the lower
    prior), or all the eligible ones where fewer."""
    n_sel = torch.minimum(wanted, eligible.sum(1))
    ranked = torch.where(eligible, loss, -torch.inf)
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (rank < n_sel[:, None])


def _grouped(rows, keep, ids, n: int, device) -> Truth:
    """The kept label ``rows`` laid out per image (``ids``), padded to the most boxes."""
    counts = torch.bincount(ids, minlength=n)
    g = max(int(counts.max()) if len(ids) else 0, 1)  # one padding slot at least
    boxes = torch.zeros(n, g, 4)
    labels = torch.zeros(n, g, dtype=torch.long)
    valid = torch.zeros(n, g, dtype=torch.bool)
    if len(ids):
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(ids)) - start[sorted_ids]
        kept = rows[keep][order]
        boxes[sorted_ids, slot] = kept[:, 3:7]
        labels[sorted_ids, slot] = torch.trunc(kept[:, 1]).long()
        valid[sorted_ids, slot] = True
    return Truth(boxes, labels, valid, device)
