"""Classify images with trained weights: pycaffe's caffe.Classifier, and the helpers of
``caffe-alex deploy`` (labels, top-k, mean files).

    from caffe_alex.tools.deploy import Classifier
    from caffe_alex.tools.pycaffe_io import load_image
    clf = Classifier("deploy.prototxt", "w.caffemodel", image_dims=(256, 256),
                     mean=np.array([104, 117, 123]), raw_scale=255, channel_swap=(2, 1, 0))
    probs = clf.predict([load_image("cat.jpg")], oversample=False)   # N x classes

The preprocessing is pycaffe's, step by step (see images.py): images load as RGB float32 in
[0, 1] (H x W x K), are resized to ``image_dims``, centre cropped to the net input (or cut into
the 10 crops of ``oversample``), then ``Transformer.preprocess``: HWC -> CHW, channel swap
(RGB -> BGR), times ``raw_scale``, minus the mean, times ``input_scale``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from google.protobuf import text_format

from ..errors import CaffeAlexError, reading
from ..formats.caffemodel import read_binaryproto
from ..net import Net
from ..proto import caffe_pb2
from .inference import for_inference, output_cost
from .pycaffe_io import Transformer, center_crop, load_batches, resize_image
from .pycaffe_io import oversample as oversample_crops  # predict's flag takes the name


# ---- Classifier -----------------------------------------------------------------------------
def configured_transformer(cls, name: str, shape, mean=None, input_scale=None, raw_scale=None,
                           channel_swap=None):  # fmt: skip
    """A Transformer (``cls``: this one, or pycaffe's caffe.io subclass) for input ``name`` of
    ``shape`` with pycaffe's Classifier settings, HWC -> CHW first."""
    transformer = cls({name: shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier:
    """pycaffe's caffe.Classifier: a TEST-phase net with a Transformer for its first input.

    ``model`` is a prototxt path or a built Net; ``weights`` files load as Net.load_weights.
    ``image_dims`` (default: the net input's H x W) is the size images are resized to before
    cropping; ``channels_last`` runs the net in NHWC memory order. ``predict`` returns the
    net's first output (sorted by name, as pycaffe's ``outputs[0]``) per image, averaged over
    the 10 crops when oversampling."""

    def __init__(self, model, weights=None, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, *, device="cpu", batch_size=None,
                 channels_last=False, transformer=Transformer, fast=False, bf16=False,
                 compile=False, keep=()):  # fmt: skip
        net = model if isinstance(model, Net) else Net.from_prototxt(model, "TEST")
        if weights:
            net.load_weights(weights)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        # the inference fast path on request (inference.py: ``keep`` names blobs read besides
        # the outputs); with bf16 the exact net stays, to measure bf16's cost (``cost``)
        self.exact, self.cost = (self.net if bf16 else None), None
        if fast or bf16 or compile:
            self.net = for_inference(self.net, fast=fast, bf16=bf16, compile=compile, keep=keep,
                                     copy_net=bf16 or isinstance(model, Net))  # fmt: skip
        # NHWC kernels and inputs: other convolution and pooling code, often faster on CPUs
        # (MobileNet-SSD and SSD300 about 10%), with float results equal up to rounding
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if not net.input_names:
            raise CaffeAlexError("the net has no input blob to feed images to")
        self.input = net.input_names[0]
        shape = net.blob_shapes[self.input]
        if len(shape) != 4:
            raise CaffeAlexError(f"input '{self.input}' has shape {shape}; images need N,K,H,W")
        self.transformer = configured_transformer(transformer, self.input, shape, mean,
                                                  input_scale, raw_scale, channel_swap)  # fmt: skip
        self.crop_dims = tuple(shape[2:])
        self.image_dims = tuple(int(d) for d in (image_dims or self.crop_dims))
        if any(i < c for i, c in zip(self.image_dims, self.crop_dims)):
            raise CaffeAlexError(
                f"image dims {self.image_dims} are smaller than the net input {self.crop_dims}"
            )
        self.channels = shape[1]
        self.batch_size = int(batch_size or shape[0])
        self.output = net.output_names[0]

    def prepare(self, inputs, oversample: bool = True) -> np.ndarray:
        """H x W x K images -> the preprocessed crops, N (or 10 N) x K x h x w."""
        resized = np.stack([resize_image(im, self.image_dims) for im in inputs])
        if oversample:
            crops = oversample_crops(resized, self.crop_dims)
        else:
            crops = center_crop(resized, self.crop_dims)
        return self.transformer.preprocess_batch(self.input, crops)

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """N x classes output for a list of H x W x K images (pycaffe's predict)."""
        out = self.forward_all(self.prepare(inputs, oversample))
        return out.reshape(len(out) // 10, 10, -1).mean(1) if oversample else out

    @torch.inference_mode()
    def forward_all(self, caffe_in: np.ndarray, blobs: Sequence[str] | None = None):
        """Run preprocessed inputs through the net in chunks of ``batch_size``; the first
        output flattened per item, or a dict of the named blobs."""
        names = [self.output] if blobs is None else list(blobs)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, len(caffe_in), self.batch_size):
            chunk = np.ascontiguousarray(caffe_in[start : start + self.batch_size])
            for n, values in zip(names, self.run(chunk, names)):
                parts[n].append(values)
        result = {n: np.concatenate(p) for n, p in parts.items()}
        return result[self.output].reshape(len(caffe_in), -1) if blobs is None else result

    def run(self, chunk: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """One chunk of preprocessed inputs through the net: the named blobs (pycaffe's
        Classifier runs its own caffe.Net here, pycaffe/classifier.py)."""
        folded = set(getattr(self.net, "folded_blobs", ())) & set(names)
        if folded:
            raise CaffeAlexError(f"blob(s) {sorted(folded)} were folded into a convolution by "
                                 "the fast path: name them in keep")  # fmt: skip
        tensor = torch.from_numpy(chunk).to(self.device)
        inputs = self._inputs(tensor.contiguous(memory_format=self.memory_format))
        self.net(**inputs)
        if self.exact is not None and self.cost is None:
            self.cost = output_cost(self.exact, self.net, inputs)
        return [self.net.blobs[n].float().cpu().numpy() for n in names]

    def _inputs(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        # other inputs (e.g. a data layer's label top) get zeros of their declared shape
        feed = {self.input: chunk}
        for name in self.net.input_names[1:]:
            shape = (len(chunk), *self.net.blob_shapes[name][1:])
            feed[name] = torch.zeros(shape, device=self.device)
        return feed

    def classify_files(self, paths: Iterable[str], *, oversample=False, batch_size=None,
                       on_error: Callable[[str, str], None] | None = None):  # fmt: skip
        """Yield (path, output vector) per readable image, ``batch_size`` images per forward;
        an unreadable one goes to ``on_error(path, message)`` and is skipped."""
        for names, images in load_batches(paths, batch_size or self.batch_size,
                                          self.channels != 1, on_error):  # fmt: skip
            yield from zip(names, self.predict(images, oversample))


def read_labels(path) -> list[str]:
    """One label per line (synset_words.txt: 'n01440764 tench, Tinca tinca'), blanks skipped."""
    return [line.strip() for line in _text(path).splitlines() if line.strip()]


def _text(path) -> str:
    with reading(path), open(path, encoding="utf-8") as f:
        try:
            return f.read()
        except UnicodeDecodeError as exc:
            raise CaffeAlexError(f"{path}: not a text file ({exc.reason})") from None


def class_names(path) -> dict[int, str]:
    """Class number -> name, from a labels file: one name per line (line i names class i, as
    synset_words.txt or MobileNet-SSD's class list with 'background' first), or SSD's
    labelmap prototxt (``item { name label display_name }``; the display name when given)."""
    text = _text(path)
    if not _LABELMAP_START.match(text):
        return dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
    labelmap = caffe_pb2.LabelMap()
    try:
        text_format.Parse(text, labelmap)
    except text_format.ParseError as exc:
        raise CaffeAlexError(f"{path}: not a labelmap prototxt: {exc}") from None
    return {item.label: item.display_name or item.name for item in labelmap.item}


# a labelmap prototxt opens with an item message (after comments and blank lines)
_LABELMAP_START = re.compile(r"\A(?:\s|#[^\n]*\n)*item\s*\{")


def output_task(net, task: str = "auto") -> tuple[str, str]:
    """(task, blob): what the net's output is and the blob to read. ``auto`` decides from the
    net: a DetectionOutput top is a detector's; a first output (by name, as pycaffe) of shape
    N x C x H x W with H and W above 1 is a segmentation's score map; anything else is a
    classifier's. A forced task is checked against the blob's shape."""
    made_by = {top: kind for step, kind in zip(net.steps, net.layer_types) for top in step.tops}
    detections = [n for n in net.output_names if made_by.get(n) == "DetectionOutput"]
    if detections and task in ("classify", "segment"):
        raise CaffeAlexError(f"--task {task}: output '{detections[0]}' holds a DetectionOutput "
                             "layer's boxes (--task detect)")  # fmt: skip
    blob = detections[0] if detections else net.output_names[0]
    shape = tuple(net.blob_shapes[blob])
    if task == "auto":
        spatial = len(shape) == 4 and shape[2] > 1 and shape[3] > 1
        task = "detect" if detections else "segment" if spatial else "classify"
    elif task == "detect" and (not shape or shape[-1] != 7):
        raise CaffeAlexError(f"--task detect: output '{blob}' has shape {list(shape)}; a "
                             "detection output has 7 values per box (SSD's "
                             "DetectionOutput)")  # fmt: skip
    elif task == "segment" and len(shape) != 4:
        raise CaffeAlexError(f"--task segment: output '{blob}' has shape {list(shape)}; a "
                             "score map is N x C x H x W")  # fmt: skip
    return task, blob


def labels_blob(net, blob: str) -> bool:
    """Whether ``blob`` holds class numbers rather than scores: an ArgMax top with one value
    per pixel (SegNet's deploy nets end so)."""
    made_by = {top: kind for step, kind in zip(net.steps, net.layer_types) for top in step.tops}
    return made_by.get(blob) == "ArgMax" and net.blob_shapes[blob][1] == 1


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (ties: lower index first)."""
    return np.argsort(-np.asarray(scores), kind="stable")[:k]


def load_mean(path=None, values=None, mode: str = "image") -> np.ndarray | None:
    """The mean for Transformer.set_mean: a .binaryproto or .npy mean image (kept as an image,
    or averaged to per-channel values with ``mode="channel"``), or explicit values."""
    if path and values is not None:
        raise CaffeAlexError("give a mean file or mean values, not both")
    if values is not None:
        return np.asarray(values, dtype=np.float32).reshape(-1)
    if not path:
        return None
    if str(path).endswith(".npy"):
        mean = np.load(path).astype(np.float32)
    else:
        mean = read_binaryproto(path)
    mean = mean[0] if mean.ndim == 4 else mean
    return mean.mean(axis=(1, 2)) if mode == "channel" and mean.ndim == 3 else mean
