"""debug_info: per-layer magnitudes in the log, in the shapes of Caffe's Net::ForwardDebugInfo
and BackwardDebugInfo (mean absolute value of each top's data, each parameter's data and diff)
and the "All net params" norms line. Bottom diffs are not logged: autograd does not keep them."""

from __future__ import annotations

import torch

from ..log import get_logger

log = get_logger()


def _mean_abs(tensor: torch.Tensor) -> float:
    return float(tensor.detach().float().abs().mean()) if tensor.numel() else 0.0


def _display_names(net):
    """Caffe's param_display_names_: the ParamSpec name, else the blob's index."""
    names = {}
    for info in net.param_infos:
        names[(info.layer, info.index)] = info.share_name or str(info.index)
    return names


def forward_info(net, blob=None) -> None:
    """``blob(name)``: a blob's values after the forward (default: the module's last)."""
    names = _display_names(net)
    blob = blob or net.blobs.__getitem__
    for step in net.steps:
        for top in step.tops:
            try:
                value = blob(top)
            except KeyError:  # not computed by the last forward
                continue
            log.info("    [Forward] Layer %s, top blob %s data: %g", step.layer, top,
                     _mean_abs(value))  # fmt: skip
        for i, param in enumerate(net.layers[step.key].blobs):  # not `blob`: the reader above
            log.info("    [Forward] Layer %s, param blob %s data: %g", step.layer,
                     names.get((step.layer, i), str(i)), _mean_abs(param))  # fmt: skip


def backward_info(net) -> None:
    for step in reversed(net.steps):
        for i, blob in enumerate(net.layers[step.key].blobs):
            if blob.requires_grad and blob.grad is not None:
                log.info("    [Backward] Layer %s, param blob %d diff: %g", step.layer, i,
                         _mean_abs(blob.grad))  # fmt: skip
    params = [info.param for info in net.learnable_params()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    asum = [float(sum(t.detach().float().abs().sum() for t in ts)) for ts in (params, grads)]
    l2 = [float(sum(t.detach().float().pow(2).sum() for t in ts)) ** 0.5 for ts in (params, grads)]
    log.error("    [Backward] All net params (data, diff): L1 norm = (%g, %g); L2 norm = (%g, %g)",
              asum[0], asum[1], l2[0], l2[1])  # fmt: skip
