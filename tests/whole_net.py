"""Whole real nets against OpenCV 4: random weights scaled so that deep nets keep activations
near 1, every blob compared (OpenCV's forward of a list of layer names gives each layer's
output), to a tolerance relative to each blob's largest |value|.

The OpenCV side may read a different text (``opencv_text``) where it implements a fork's layer
under another name or order; it reads the same weights, written as a caffemodel by layer name
(plus ``extra_model``: more serialized layers, for blobs only OpenCV wants).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from caffe_alex.net import Net
from tests.reference import caffemodel_bytes, relative_error

# Layer types whose first blob is a filter bank read as (out, in, kernel...): scaled by fan-in.
_FILTERS = {"Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", "InnerProduct"}


def randomize_scaled(net: Net, seed: int = 0) -> None:
    """He-scaled filters, Scale near 1, small other blobs (BatchNorm statistics are set by
    ``calibrate_batch_norms``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer(name).type_name
            for index, blob in enumerate(blobs):
                noise = torch.randn(blob.shape, generator=gen)
                if kind in _FILTERS and index == 0:
                    fan_in = max(1, blob[0].numel())
                    blob.copy_(noise * (2.0 / fan_in) ** 0.5)
                elif kind == "Scale" and index == 0:
                    blob.copy_(1 + 0.1 * noise)
                else:
                    blob.copy_(0.1 * noise)


def calibrate_batch_norms(net: Net, inputs: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Set each BatchNorm's statistics near its bottom's actual per-channel mean and variance
    (run once with pre-forward hooks, in layer order), so that random deep nets stay near unit
    scale instead of growing until float32 rounding dominates the comparison."""
    gen = torch.Generator().manual_seed(seed)

    def calibrate(layer, args):
        x = args[0].detach()
        axes = [0, *range(2, x.dim())]
        mean = x.mean(dim=axes)
        # The layer's average variance for every channel: a channel that varies little over a
        # few pixels is not blown up (that would amplify float32 rounding, not test anything).
        var = x.var(dim=axes, unbiased=False).mean() + 1e-6
        jitter = torch.rand(mean.shape, generator=gen)
        with torch.no_grad():
            layer.blobs[0].copy_(mean + 0.1 * (jitter - 0.5) * var.sqrt())
            layer.blobs[1].copy_(var * (0.75 + 0.5 * jitter))
            layer.blobs[2].fill_(1.0)

    hooks = [
        net.layer(name).register_forward_pre_hook(calibrate)
        for name, kind in zip(net.layer_names, net.layer_types, strict=True)
        if kind == "BatchNorm"
    ]
    try:
        with torch.no_grad():
            net(**inputs)
    finally:
        for hook in hooks:
            hook.remove()


def last_writers(net: Net) -> dict[str, str]:
    """Each computed blob's final writer: the layer whose output OpenCV reports under that
    layer's name (in-place chains end at the last layer; only first tops, which is what OpenCV
    returns)."""
    writers = {}
    for step in net.steps:
        if step.tops and not net.layer(step.layer).is_source:
            writers[step.tops[0]] = step.layer
    return writers


def opencv_outputs(text: str, model: bytes, inputs: dict[str, np.ndarray], writers: dict):
    """OpenCV's value of each blob of ``writers`` (blob -> its last writer's name). OpenCV 4.14
    names some final layers after their top, so a writer it does not know is asked for by the
    blob's name."""
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        proto_path, model_path = os.path.join(tmp, "n.prototxt"), os.path.join(tmp, "n.model")
        with open(proto_path, "w") as f:
            f.write(text)
        with open(model_path, "wb") as f:
            f.write(model)
        cv_net = cv2.dnn.readNetFromCaffe(proto_path, model_path)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.enableFusion(False)  # every layer's own output, not a fused chain's
    for name, value in inputs.items():
        cv_net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
    known = set(cv_net.getLayerNames())
    asked = {blob: layer if layer in known else blob for blob, layer in writers.items()}
    layers = sorted(set(asked.values()))
    values = dict(zip(layers, (np.asarray(r) for r in cv_net.forward(layers)), strict=True))
    return {blob: values[layer] for blob, layer in asked.items()}


def compare_net_with_opencv(
    path: str,
    *,
    opencv_text: str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    extra_model: bytes = b"",
    expect: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[Net, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Build ``path`` (TEST), run it here and in OpenCV on the same random weights and input,
    and assert every blob agrees to ``tol`` of its largest |value|; for a blob in
    ``expect``, OpenCV's value is compared with ``expect[blob](our value)`` (a layer OpenCV
    implements with another output). Returns the net, our blobs, OpenCV's outputs by blob name
    and the relative errors."""
    net = Net.from_prototxt(path, "TEST", input_shapes=input_shapes)
    randomize_scaled(net, seed)
    rng = np.random.default_rng(seed)
    inputs = {
        n: rng.standard_normal(net.blob_shapes[n]).astype(np.float32) for n in net.input_names
    }
    feed = {k: torch.from_numpy(v) for k, v in inputs.items()}
    calibrate_batch_norms(net, feed, seed)
    with torch.no_grad():
        net(**feed)
    ours = {k: v.numpy() for k, v in net.blobs.items()}
    writers = last_writers(net)
    if opencv_text is None:
        with open(path) as f:
            opencv_text = f.read()
    model = caffemodel_bytes(net) + extra_model
    theirs = opencv_outputs(opencv_text, model, inputs, writers)
    errors = {}
    for blob, value in theirs.items():
        mine = ours[blob] if blob not in (expect or {}) else expect[blob](ours[blob])
        assert value.size == mine.size, f"{blob}: {value.shape} vs ours {mine.shape}"
        assert np.isfinite(mine).all(), f"{blob}: non-finite values"
        errors[blob] = relative_error(mine, value)
    worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
    assert worst[0][1] <= tol, f"largest relative errors: {worst}"
    return net, ours, theirs, errors
