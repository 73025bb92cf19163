"""Run a net in caffe-alex and in OpenCV's dnn module (an independent implementation of Caffe's
forward pass, reading the prototxt and .caffemodel with its own parser) on the same
preprocessed inputs, and measure how far every blob both expose lies apart.

What "a blob both expose" means here: a blob's value after the last layer that writes it (a
blob written in place by ReLU, BatchNorm or Dropout is compared after the last of them), which
OpenCV returns as the output of that layer. OpenCV names a layer after its single top unless
the layer works in place, and returns only the first top of a layer with several, so:
- a blob written by a layer with several tops is compared for the first top only;
- a blob whose last writer OpenCV has no layer for is listed as not exposed.
OpenCV's layer fusion is turned off: with it, a Concat's inputs are computed straight into
slices of the Concat's output, whose memory is reused once the Concat's readers are done, so an
input asked for comes back overwritten (GoogLeNet: all 36 inception branch blobs, relative
differences of 1 to infinity); and a convolution fused with its BatchNorm, Scale and ReLU would
hide which of them differs. Every value compared is then one layer's own computation.

Where OpenCV cannot run a layer (a type it does not know, or a layer it refuses), the net is
cut before that layer and compared up to it; the layer is named in the result.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import CaffeAlexError
from ..formats.filtering import filter_net, make_state
from ..formats.hdf5 import is_hdf5
from ..formats.prototxt import read_net, to_text
from ..formats.weights import save_weights
from ..proto import caffe_pb2

_CANNOT_CREATE = re.compile(r"Can't create layer \"([^\"]*)\" of type \"([^\"]*)\"")


@dataclass
class BlobDiff:
    blob: str
    layer: str  # the caffe-alex layer that last writes the blob
    shape: tuple[int, ...]
    max_abs: float
    relative: float  # max |ours - OpenCV| / max |OpenCV|
    note: str = ""  # a shape mismatch, said in words


@dataclass
class Comparison:
    diffs: list[BlobDiff] = field(default_factory=list)
    not_exposed: list[tuple[str, str]] = field(default_factory=list)  # (blob, why)
    unsupported: tuple[str, str, str] | None = None  # (layer, type, OpenCV's message)
    output: str | None = None  # the blob top-1/top-5 are read from
    top1: tuple[int, int] | None = None  # (agreeing images, images)
    top5: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def above(self, tolerance: float) -> list[BlobDiff]:
        """The blobs whose relative difference exceeds ``tolerance``, in net order."""
        return [d for d in self.diffs if not d.relative <= tolerance]


def opencv():
    """OpenCV's Python module, with its dnn part, or a one-line error saying what is missing."""
    try:
        import cv2  # imported on use: only compare needs the dnn module
    except ImportError as exc:
        raise CaffeAlexError(
            f"compare needs OpenCV (pip install opencv-python-headless): {exc}"
        ) from None
    if not hasattr(cv2, "dnn"):
        raise CaffeAlexError("compare needs OpenCV's dnn module; this OpenCV build has none")
    return cv2


def _cv_message(exc: Exception) -> str:
    """OpenCV's error without its file/line prefix: the last line, after 'error: (-N:...)'."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"^OpenCV\([^)]*\) \S+: error: \([^)]*\) ", "", text)
    return re.sub(r" in function '[^']*'$", "", text)


def is_caffemodel(weights: str) -> bool:
    """Whether a --weights value is one binary .caffemodel, which OpenCV reads itself."""
    if "," in weights:
        return False
    lower = weights.lower()
    if lower.endswith((".pt", ".pth", ".safetensors")):
        return False
    return not (os.path.isfile(weights) and is_hdf5(weights))


def test_layers(model: str) -> list[caffe_pb2.LayerParameter]:
    """The TEST-phase layers of ``model`` (upgraded), as caffe-alex builds them."""
    net_param, _ = read_net(model)
    return list(filter_net(net_param, make_state("TEST")).layer)


def last_writers(net) -> dict[str, tuple[str, int]]:
    """Blob -> (the last layer of ``net`` writing it, that layer's top index), in net order;
    inputs and caffe-alex's automatic tops are left out."""
    writers: dict[str, tuple[str, int]] = {}
    for step in net.steps:
        if net.layers[step.key].is_source:
            continue
        for index, top in enumerate(step.tops):
            if not top.startswith("("):
                writers.pop(top, None)  # re-insert: the order is the last write's
                writers[top] = (step.layer, index)
    return writers


class OpenCVNet:
    """OpenCV's net for the comparison, cut before the first layer it cannot run."""

    def __init__(self, cv2, model: str, weights: str, layers: list[caffe_pb2.LayerParameter],
                 workdir: str):  # fmt: skip
        self.cv2, self.model, self.weights, self.workdir = cv2, model, weights, workdir
        self.layers = layers
        self.unsupported: tuple[str, str, str] | None = None
        self.net = self._read(model)
        self.names: dict[str, str] = {}

    def _read(self, prototxt: str):
        try:
            net = self.cv2.dnn.readNetFromCaffe(prototxt, self.weights)
        except self.cv2.error as exc:
            raise CaffeAlexError(f"OpenCV cannot read {prototxt}: {_cv_message(exc)}") from None
        net.setPreferableBackend(self.cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(self.cv2.dnn.DNN_TARGET_CPU)
        net.enableFusion(False)
        return net

    def _prefix(self, count: int) -> str:
        """A prototxt of the first ``count`` TEST layers, written to the work folder."""
        net_param = caffe_pb2.NetParameter(name="prefix")
        net_param.layer.extend(self.layers[:count])
        path = os.path.join(self.workdir, f"prefix{count}.prototxt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(to_text(net_param))
        return path

    def _index_of(self, cv_name: str) -> int | None:
        for index, layer in enumerate(self.layers):
            if layer.name == cv_name or list(layer.top) == [cv_name]:
                return index
        return None

    def _runs(self, net, inputs: dict[str, np.ndarray]) -> Exception | None:
        try:
            for name, value in inputs.items():
                net.setInput(value, name)
            net.forward()
        except self.cv2.error as exc:
            return exc
        return None

    def prepare(self, inputs: dict[str, np.ndarray]) -> None:
        """Run the net once; if OpenCV fails, find the first layer it cannot run (named in
        its message, or else by bisecting on the number of layers) and keep the layers before
        it."""
        failure = self._runs(self.net, inputs)
        if failure is None:
            return
        found = _CANNOT_CREATE.search(str(failure))
        index = self._index_of(found.group(1)) if found else None
        if index is None:
            index, failure = self._first_failing(inputs, failure)
        prefix = self._read(self._prefix(index)) if index else None
        if prefix is None or self._runs(prefix, inputs) is not None:
            raise CaffeAlexError(f"OpenCV cannot run {self.model}: {_cv_message(failure)}")
        layer = self.layers[index]
        self.net, self.unsupported = prefix, (layer.name, layer.type, _cv_message(failure))

    def _first_failing(self, inputs, failure) -> tuple[int | None, Exception]:
        """(index of the layer whose addition makes the net fail, OpenCV's error there)."""
        low, high = 0, len(self.layers)  # the first `low` layers run; all `high` fail
        while high - low > 1:
            middle = (low + high) // 2
            error = self._runs(self._read(self._prefix(middle)), inputs)
            if error is None:
                low = middle
            else:
                high, failure = middle, error
        return (high - 1 if high > 0 else None), failure

    def output_name(self, layer: caffe_pb2.LayerParameter) -> str | None:
        """OpenCV's name for ``layer``'s first output, or None where it has no such layer."""
        known = set(self.net.getLayerNames())
        in_place = bool(set(layer.top) & set(layer.bottom))
        candidates = [layer.name] if in_place or len(layer.top) != 1 else [layer.top[0], layer.name]
        return next((c for c in candidates if c in known), None)

    def forward(self, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        for name, value in inputs.items():
            self.net.setInput(value, name)
        try:
            return [np.asarray(v) for v in self.net.forward(names)]
        except self.cv2.error as exc:
            raise CaffeAlexError(f"OpenCV's forward pass failed: {_cv_message(exc)}") from None


def _relative(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max(initial=0.0))
    scale = float(np.abs(theirs).max(initial=0.0))
    if scale == 0.0:
        return diff, 0.0 if diff == 0.0 else float("inf")
    return diff, diff / scale


def _agreement(ours: np.ndarray, theirs: np.ndarray, k: int) -> int:
    ours, theirs = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    k = min(k, ours.shape[1])
    agree = 0
    for a, b in zip(ours, theirs):
        top_a = np.argsort(-a, kind="stable")[:k]
        top_b = np.argsort(-b, kind="stable")[:k]
        agree += int(set(top_a) == set(top_b) if k > 1 else top_a[0] == top_b[0])
    return agree


def _plan(net, cv_net: OpenCVNet, result: Comparison) -> list[tuple[str, str, str]]:
    """(blob, caffe-alex layer, OpenCV output name) for each blob both expose; the others go to
    ``result.not_exposed`` with the reason."""
    by_name = {layer.name: layer for layer in cv_net.layers}
    plan = []
    for blob, (layer_name, index) in last_writers(net).items():
        layer = by_name.get(layer_name)
        cv_name = cv_net.output_name(layer) if layer is not None else None
        if index > 0:
            why = f"top #{index} of '{layer_name}': OpenCV returns a layer's first top only"
        elif cv_name is None and cv_net.unsupported:
            why = f"layer '{layer_name}' is not before '{cv_net.unsupported[0]}'"
        elif cv_name is None:
            why = f"OpenCV's net has no layer '{layer_name}'"
        else:
            plan.append((blob, layer_name, cv_name))
            continue
        result.not_exposed.append((blob, why))
    return plan


def _diff(blob: str, layer: str, mine: np.ndarray, reference: np.ndarray) -> BlobDiff:
    if mine.size != reference.size:
        inf = float("inf")
        return BlobDiff(blob, layer, mine.shape, inf, inf,
                        f"shape {mine.shape} vs OpenCV {reference.shape}")  # fmt: skip
    note = f"OpenCV's shape {reference.shape}" if mine.shape != reference.shape else ""
    max_abs, relative = _relative(mine, reference.reshape(mine.shape))
    return BlobDiff(blob, layer, mine.shape, max_abs, relative, note)


def compare(
    classifier,
    model: str,
    weights: str,
    batch: np.ndarray,
    *,
    opencv_model: str | None = None,
    opencv_weights: str | None = None,
) -> Comparison:
    """Compare ``classifier``'s net (caffe_alex.tools.deploy.Classifier, built from ``model``
    with ``weights`` loaded) with OpenCV's on ``batch`` (preprocessed, N x K x H x W).

    OpenCV reads ``opencv_model`` / ``opencv_weights`` (default: the same files); weights that
    are not one .caffemodel are given to it as a .caffemodel written from the loaded net."""
    cv2 = opencv()
    net = classifier.net
    result = Comparison()
    inputs = _inputs(classifier, batch)
    with tempfile.TemporaryDirectory(prefix="caffe-alex-compare-") as workdir:
        cv_weights = _opencv_weights(net, weights, opencv_weights, workdir, result.notes)
        cv_model = opencv_model or model
        cv_net = OpenCVNet(cv2, cv_model, cv_weights, test_layers(cv_model), workdir)
        cv_net.prepare(inputs)
    result.unsupported = cv_net.unsupported
    plan = _plan(net, cv_net, result)
    ours = classifier.forward_all(batch, blobs=[blob for blob, _, _ in plan])
    theirs = cv_net.forward(inputs, [cv_name for _, _, cv_name in plan])
    result.diffs = [_diff(b, layer, ours[b], ref) for (b, layer, _), ref in zip(plan, theirs)]
    _agreement_on_output(result, classifier.output, ours, theirs)
    return result


def _inputs(classifier, batch: np.ndarray) -> dict[str, np.ndarray]:
    """What both nets are fed: the batch, and zeros for any further input, as the Classifier
    feeds them (e.g. a label input)."""
    net = classifier.net
    inputs = {classifier.input: np.ascontiguousarray(batch, dtype=np.float32)}
    for name in net.input_names[1:]:
        inputs[name] = np.zeros((len(batch), *net.blob_shapes[name][1:]), np.float32)
    return inputs


def _opencv_weights(net, weights: str, opencv_weights, workdir: str, notes: list[str]) -> str:
    """The .caffemodel OpenCV reads: the one given, else a copy of the loaded net's weights
    written to ``workdir`` when ``weights`` is not one .caffemodel (said in ``notes``)."""
    if opencv_weights or is_caffemodel(weights):
        return opencv_weights or weights
    path = os.path.join(workdir, "weights.caffemodel")
    save_weights(net, path, kind="caffemodel")
    notes.append(
        f"OpenCV reads a .caffemodel written by caffe-alex from {weights} (give "
        "--opencv-weights ORIGINAL.caffemodel to check the conversion as well)"
    )
    return path


def _agreement_on_output(result: Comparison, output: str, ours, theirs) -> None:
    """Top-1 and top-5 agreement on the net's output, where that blob was compared with a
    finite difference."""
    found = {d.blob: (d, ref) for d, ref in zip(result.diffs, theirs)}
    if output in found and np.isfinite(found[output][0].max_abs):
        mine = ours[output]
        reference = found[output][1].reshape(mine.shape)
        result.output = output
        result.top1 = (_agreement(mine, reference, 1), len(mine))
        result.top5 = (_agreement(mine, reference, 5), len(mine))


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def report_lines(result: Comparison, tolerance: float) -> list[str]:
    """The comparison as text: a line per blob, then what was left out and the agreement."""
    rows = [("blob", "layer", "shape", "max |diff|", "relative", "")]
    for d in result.diffs:
        flag = "ok" if d.relative <= tolerance else "DIFFERS"
        if d.note:
            flag += f" ({d.note})"
        rows.append((d.blob, d.layer, _shape(d.shape), f"{d.max_abs:.3g}", f"{d.relative:.3g}",
                     flag))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in
                       enumerate(zip(r, widths))) + f"  {r[5]}" for r in rows]  # fmt: skip
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "-" * max(len(line) for line in lines))
    if result.unsupported:
        name, kind, message = result.unsupported
        lines.append(f"OpenCV cannot run layer '{name}' ({kind}): {message.rstrip('.')}; "
                     "compared the blobs before it")  # fmt: skip
    for blob, why in result.not_exposed:
        lines.append(f"not compared: {blob} ({why})")
    lines += result.notes
    if result.top1 is not None:
        (a1, n), (a5, _) = result.top1, result.top5
        lines.append(f"top-1 agreement on '{result.output}': {a1}/{n} images; top-5: {a5}/{n}")
    elif result.diffs:
        lines.append("top-1/top-5 agreement: the net's output is not compared")
    return lines
