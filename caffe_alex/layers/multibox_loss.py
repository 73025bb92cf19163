"""SSD's MultiBoxLoss (weiliu89/caffe, branch ``ssd``): match prior boxes to the ground truth,
mine hard negatives, then a localization loss on the matched priors and a confidence loss on the
matched and mined ones.

Bottoms: loc (N, P * 4 * loc_classes), conf (N, P * num_classes), the PriorBox blob
(1, 2, P * 4: boxes then variances) and the AnnotatedData label (1, 1, G, 8: image, label,
instance, xmin, ymin, xmax, ymax, difficult). The loss is
``loc_weight * loc_loss / normalizer + conf_loss / normalizer``, where loc_loss sums Smooth L1
(or half the squared error, L2) of the encoded offsets over the matches and conf_loss sums
the softmax (or logistic) cross-entropy over the selected predictions, with no normalization
of their own (the fork's inner SmoothL1Loss, EuclideanLoss, SoftmaxWithLoss and
SigmoidCrossEntropyLoss layers all see a batch of 1). The matching and mining are choices, not
functions of the scores, so the true gradient of that sum is the fork's: only the matched and
mined predictions get one, priors and labels none. As in the fork, a term whose bottom has
propagate_down false is left out of the loss value too.

The ground truth is read on the host (the fork reads it on the CPU, too); matching, mining (both
in multibox_match.py) and the losses run on the blobs' device. Box arithmetic is float32, as in
the fork's NormalizedBBox.
"""

from __future__ import annotations

import math

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, count, register
from . import bbox
from .multibox_match import Matcher

_P = caffe_pb2.MultiBoxLossParameter
_Norm = caffe_pb2.LossParameter
_MAX_NLL = -math.log(1.1754943508222875e-38)  # -log(FLT_MIN): the fork's clamp
_FIELDS = frozenset(f.name for f in _P.DESCRIPTOR.fields) - {"nms_param"}


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.element_size() < 4 else x


def _legacy_height(shape) -> int:
    """Caffe's Blob::height() (LegacyShape(2)): axis 2, or 1 for a blob with fewer axes."""
    return shape[2] if len(shape) > 2 else 1


def _softmax_nll(scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-log(max(p[label], FLT_MIN)) along the last axis, with the gradient p - onehot that the
    fork's SoftmaxWithLoss keeps past the clamp."""
    nll = -torch.log_softmax(scores, -1).gather(-1, label.unsqueeze(-1)).squeeze(-1)
    return torch.where(nll > _MAX_NLL, nll - nll.detach() + _MAX_NLL, nll)


def _logistic(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SigmoidCrossEntropyLoss per element, in the fork's overflow-free form."""
    positive = (x >= 0).to(x.dtype)
    return torch.log(1 + torch.exp(x - 2 * x * positive)) - x * (target - positive)


def _smooth_l1(d: torch.Tensor) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < 1, 0.5 * d * d, a - 0.5)


def _split_priors(priors: torch.Tensor, num_priors: int):
    """The PriorBox blob's boxes and variances, (P, 4) float32 each."""
    flat = priors.detach().reshape(-1)
    boxes = flat[: num_priors * 4].reshape(num_priors, 4).float()
    variances = flat[num_priors * 4 : num_priors * 8].reshape(num_priors, 4).float()
    return boxes, variances


def _check_options(p) -> None:
    """The fork's checks of multibox_loss_param, in its order."""
    if not p.HasField("num_classes"):
        raise LayerConfigError("multibox_loss_param.num_classes must be given")
    classes, background, mining = int(p.num_classes), int(p.background_label_id), p.mining_type
    if classes < 1:
        raise LayerConfigError("multibox_loss_param.num_classes should not be less than 1")
    if p.HasField("do_neg_mining") and p.do_neg_mining != (mining != _P.NONE):
        raise LayerConfigError(
            f"multibox_loss_param.do_neg_mining ({str(p.do_neg_mining).lower()}, deprecated) "
            f"contradicts mining_type {_P.MiningType.Name(mining)}"
        )
    if mining != _P.NONE and not p.share_location:
        raise LayerConfigError(
            f"negative mining (mining_type {_P.MiningType.Name(mining)}) needs share_location: true"
        )
    if mining == _P.HARD_EXAMPLE and p.sample_size <= 0:
        raise LayerConfigError("HARD_EXAMPLE mining needs multibox_loss_param.sample_size > 0")
    if p.conf_loss_type == _P.SOFTMAX and background >= classes:
        raise LayerConfigError(
            f"background_label_id {background} should be within [0, num_classes {classes}) "
            "for the SOFTMAX confidence loss"
        )
    if mining != _P.NONE and background >= classes:
        raise LayerConfigError(
            f"background_label_id {background} must be < num_classes {classes} for negative mining"
        )
    if p.map_object_to_agnostic and classes != 2:
        raise LayerConfigError(
            f"map_object_to_agnostic needs num_classes 2 (background and object), got {classes}"
        )


def _normalization(lp) -> int:
    """loss_param's normalization, or the deprecated normalize where it alone is given."""
    if not lp.HasField("normalization") and lp.HasField("normalize"):
        return _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
    return lp.normalization


@register("MultiBoxLoss")
class MultiBoxLossLayer(CaffeLayer):
    """``multibox_loss_param``: num_classes (required), loc_loss_type (SMOOTH_L1, L2),
    conf_loss_type (SOFTMAX, LOGISTIC), loc_weight, share_location, match_type (BIPARTITE,
    PER_PREDICTION), overlap_threshold, use_prior_for_matching, background_label_id,
    use_difficult_gt, mining_type (NONE, MAX_NEGATIVE, HARD_EXAMPLE) with neg_pos_ratio,
    neg_overlap, sample_size, code_type (CORNER, CENTER_SIZE, CORNER_SIZE),
    encode_variance_in_target, map_object_to_agnostic, ignore_cross_boundary_bbox, bp_inside,
    the deprecated do_neg_mining. Not nms_param (NMS before selecting hard examples).
    ``loss_param``: normalization (VALID: by the number of matches, the default), normalize."""

    bottoms = (4, 4)
    is_loss = True
    params = {"multibox_loss_param": _FIELDS, "loss_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = self.p = layer_param.multibox_loss_param
        _check_options(p)
        self.classes = int(p.num_classes)
        self.loc_classes = 1 if p.share_location else self.classes
        self.background = int(p.background_label_id)
        self.mining = p.mining_type
        self.normalization = _normalization(layer_param.loss_param)
        # The fork adds each term only where its bottom propagates down (default: both).
        down = list(layer_param.propagate_down) or [True, True]
        self.use_loc, self.use_conf = bool(down[0]), bool(down[1])
        self.matcher = Matcher(p)

    def top_shapes(self, bottom_shapes):
        loc, conf, priors, label = bottom_shapes
        if not loc or not conf or loc[0] != conf[0]:
            raise LayerConfigError(
                f"loc and conf must have the same first dimension: {list(loc)} vs {list(conf)}"
            )
        num_priors = _legacy_height(priors) // 4
        if count(priors) < 2 * num_priors * 4:
            raise LayerConfigError(
                f"the prior blob {list(priors)} must hold the boxes and their variances "
                "(1 x 2 x num_priors * 4, a PriorBox top)"
            )
        if num_priors * self.loc_classes * 4 != count(loc, 1):
            raise LayerConfigError(
                f"number of priors must match number of location predictions: {num_priors} "
                f"priors x {self.loc_classes * 4} need {num_priors * self.loc_classes * 4} "
                f"values per image, loc {list(loc)} has {count(loc, 1)}"
            )
        if num_priors * self.classes != count(conf, 1):
            raise LayerConfigError(
                f"number of priors must match number of confidence predictions: {num_priors} "
                f"priors x {self.classes} classes need {num_priors * self.classes} values per "
                f"image, conf {list(conf)} has {count(conf, 1)}"
            )
        if count(label) != _legacy_height(label) * 8:
            raise LayerConfigError(
                f"the label blob {list(label)} must be 1 x 1 x num_gt x 8 (AnnotatedData's "
                "box rows)"
            )
        return [()]

    def _bad(self, message: str) -> CaffeAlexError:
        return CaffeAlexError(message, layer=self.name, layer_type=self.type_name)

    # -- the losses per prior -------------------------------------------------------------
    def _loc_terms(self, loc, priors, variances, truth, index):
        """(prediction, target) per loc class and prior, (N, L, P, 4), as EncodeLocPrediction
        forms them (zero where there is no match)."""
        p = self.p
        positive = index >= 0
        gt = truth.boxes[:, None].expand(-1, index.shape[1], -1, -1)
        matched = gt.gather(2, index.clamp(min=0)[..., None].expand(-1, -1, -1, 4))
        target = bbox.encode(priors, variances, matched, p.code_type, p.encode_variance_in_target)
        target = torch.where(positive[..., None], target, 0.0)
        pred = loc.permute(0, 2, 1, 3)  # (N, L, P, 4)
        if p.bp_inside:  # a coordinate outside the image gets its target: no gradient there
            box = priors.float()
            if not p.use_prior_for_matching:
                box = bbox.decode(
                    priors, variances, pred.detach(), p.code_type, p.encode_variance_in_target
                )
            outside = (box < 0) | (box > 1)
            pred = torch.where(outside, target.to(pred.dtype), pred)
        if p.encode_variance_in_target:
            # The fork divides its copy of the predictions by the variances and hands the loss
            # layer's gradient back unscaled: the gradient is taken as if with respect to
            # pred / variance. Reproduced: the value divided, the gradient passed through.
            v = variances.float()
            pred = pred + (pred / v.to(pred.dtype) - pred).detach()
            target = target / v
        return pred, target.to(pred.dtype), positive

    def _conf_loss_per_prior(self, scores, label):
        """ComputeConfLoss: each prior's confidence loss against ``label`` (N, P)."""
        if self.p.conf_loss_type == _P.SOFTMAX:
            return _softmax_nll(scores, label)
        target = torch.nn.functional.one_hot(label, self.classes).to(scores.dtype)
        return _logistic(scores, target).sum(-1)

    def _loc_loss(self, diff):
        """The loc loss of each coordinate's ``diff``: Smooth L1, or half its square (L2)."""
        return _smooth_l1(diff) if self.p.loc_loss_type == _P.SMOOTH_L1 else 0.5 * diff * diff

    def _mine(self, scores, gt_label, positive, index, overlap, truth, pred, target):
        """The mined negatives (N, P) and the positives that stay (N, P), ranked by each
        prior's confidence loss (plus its loc loss for HARD_EXAMPLE)."""
        # each prior's class: its first loc class with a match (the fork's map order)
        matched_class = torch.where(positive, gt_label, self.background)
        first = positive.float().argmax(1, keepdim=True)
        prior_label = torch.where(
            positive.any(1), matched_class.gather(1, first).squeeze(1), self.background
        )
        loc_per_prior = 0.0
        if self.mining == _P.HARD_EXAMPLE:
            diff = (pred - target).detach().float()[:, 0]
            loc_per_prior = torch.where(positive[:, 0], self._loc_loss(diff).sum(-1), 0.0)
        conf_loss = self._conf_loss_per_prior(scores.detach(), prior_label).float()
        return self.matcher.mine(conf_loss, index, overlap, truth, loc_per_prior)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, loc, conf, priors, label):
        n = loc.shape[0]
        num_priors = _legacy_height(priors.shape) // 4
        boxes, variances = _split_priors(priors, num_priors)
        dtype = torch.promote_types(_wide(loc).dtype, _wide(conf).dtype)
        loc = loc.to(dtype).reshape(n, num_priors, self.loc_classes, 4)
        scores = conf.to(dtype).reshape(n, num_priors, self.classes)
        truth = self.matcher.ground_truth(label, n, loc.device, self._bad)

        index, overlap = self.matcher.find_matches(loc.detach(), boxes, variances, truth)
        pred, target, positive = self._loc_terms(loc, boxes, variances, truth, index)
        gt_label = truth.labels[:, None].expand(-1, index.shape[1], -1)
        gt_label = gt_label.gather(2, index.clamp(min=0))
        negative = None
        if self.mining != _P.NONE:
            negative, kept = self._mine(
                scores, gt_label, positive, index, overlap, truth, pred, target
            )
            positive = kept[:, None]
        return self._total(scores, pred, target, positive, negative, gt_label, num_priors)

    def _total(self, scores, pred, target, positive, negative, gt_label, num_priors):
        """The loss: each term kept (see use_loc, use_conf) over the normalizer."""
        total = scores.new_zeros(())
        norm = self._normalizer(scores.shape[0], num_priors, positive.sum(), total)
        if self.use_loc:
            diff = torch.where(positive[..., None], pred - target, 0.0)
            total = total + self.p.loc_weight * self._loc_loss(diff).sum() / norm
        if self.use_conf:
            total = total + self._conf_loss(scores, positive, negative, gt_label) / norm
        return total

    def _conf_loss(self, scores, positive, negative, gt_label):
        """EncodeConfPrediction and the inner confidence loss layer."""
        p = self.p
        n, num_priors, classes = scores.shape
        label = (
            gt_label
            if not p.map_object_to_agnostic
            else torch.full_like(gt_label, self.background + 1)
        )
        if negative is not None:  # mined: the positives and the chosen negatives
            pos, lab = positive[:, 0], label[:, 0]
            if p.conf_loss_type == _P.SOFTMAX:
                nll = _softmax_nll(scores, torch.where(pos, lab, self.background))
                return torch.where(pos | negative, nll, 0.0).sum()
            # the target rows start filled with background_label_id, then a 1 at the class
            target = torch.full_like(scores, float(self.background))
            one = torch.where(pos, lab, self.background)
            target.scatter_(2, one[..., None], 1.0)
            elem = _logistic(scores, target).sum(-1)
            return torch.where(pos | negative, elem, 0.0).sum()
        if p.conf_loss_type == _P.SOFTMAX:
            # every prior of every image; the last loc class with a match sets the label
            last = positive.shape[1] - 1 - positive.flip(1).float().argmax(1, keepdim=True)
            chosen = label.gather(1, last).squeeze(1)
            target = torch.where(positive.any(1), chosen, self.background)
            return _softmax_nll(scores, target).sum()
        # LOGISTIC without mining: the fork fills the (N * P, C) targets with
        # background_label_id and, for a match of image i, prior j, class c, writes the 1 at
        # flat position i * P + j * C + c (it steps its target pointer by P per image, not
        # P * C). Reproduced as written.
        target = torch.full((n * num_priors * classes,), float(self.background),
                            dtype=scores.dtype, device=scores.device)  # fmt: skip
        i, _, j = torch.nonzero(positive, as_tuple=True)
        c = label[positive]
        target[i * num_priors + j * classes + c] = 1.0
        return _logistic(scores.reshape(-1), target).sum()

    def _normalizer(self, n, num_priors, matches, like):
        """LossLayer::GetNormalizer with valid_count = the number of matches, at least 1."""
        mode = self.normalization
        if mode == _Norm.VALID:
            return matches.to(like.dtype).clamp(min=1)
        sizes = {_Norm.FULL: n * num_priors, _Norm.BATCH_SIZE: n, _Norm.NONE: 1}
        return float(max(1, sizes[mode]))
