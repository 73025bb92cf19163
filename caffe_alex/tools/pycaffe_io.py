"""pycaffe's caffe.io, the part deploy and feature extraction use: loading images as pycaffe
does (RGB float32 in [0, 1], H x W x K), its resize, centre crop and 10-crop ``oversample``,
and its ``Transformer`` (HWC -> CHW, channel swap, raw scale, mean, input scale).

``resize_image`` is pycaffe's: the image is stretched to [0, 1] by its own min and max, resized
by scikit-image's ``resize`` (order 1, mode 'constant'), and stretched back; images of another
channel count than 1 or 3 go through scipy's ``zoom``. With scikit-image installed (the
``pycaffe`` extra, ``pip install 'caffe-alex[pycaffe]'``) those very functions run, so the
numbers are those of the pycaffe a user installs today, whatever its version (since 0.15 it
blurs before shrinking: ``anti_aliasing``). Without it, a NumPy transcription of the
scikit-image of Caffe's time (<= 0.14) runs, order 1 only: bilinear at pixel centres, no
anti-aliasing, samples beyond the border count as the constant 0 of the stretched image; on a
shrunk photo it differs from today's pycaffe by up to ~0.1 of the value range (a note in the
log says so once). ``resize_behaviour()`` names the one in use.

Decoding is Pillow's (pycaffe used scikit-image, which reads through Pillow or imageio).
"""

from __future__ import annotations

import glob
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..data.datum import ImageError
from ..errors import CaffeAlexError, describe
from ..formats.atomic import atomic_path
from ..log import get_logger

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split()
)
# skimage's rgb2gray weights (ITU-R 709), which pycaffe's load_image(color=False) uses
_GREY = np.array([0.2125, 0.7154, 0.0721])


# ---- images -------------------------------------------------------------------------------
def load_image(path, color: bool = True) -> np.ndarray:
    """An image file as H x W x 3 RGB (or H x W x 1 grey) float32 in [0, 1], as pycaffe's
    caffe.io.load_image: alpha is dropped, grey images are repeated to 3 channels when
    ``color``. An unreadable file raises ImageError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            array = _pil_to_float(image)
    except OSError as exc:
        raise ImageError(f"cannot read image '{path}': {_reason(exc)}") from None
    except Exception as exc:  # PIL raises assorted errors on damaged files
        raise ImageError(f"cannot decode image '{path}': {_reason(exc)}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if not color and array.shape[2] == 3:
        return (array @ _GREY)[:, :, None].astype(np.float32)
    if color and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array.astype(np.float32, copy=False)


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _pil_to_float(image) -> np.ndarray:
    # skimage.img_as_float: integers divide by their type's maximum, floats stay as they are
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float64) / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float64)
    if image.mode == "I":
        return np.asarray(image, dtype=np.float64) / 2147483647.0
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA") else "RGB")
    return np.asarray(image, dtype=np.float64) / 255.0


def _resize_axis(n_in: int, n_out: int):
    """Source indices and weights of skimage's order-1 resize along one axis: the output pixel
    centre maps to ``(i + 0.5) * n_in / n_out - 0.5``; a neighbour beyond the edge weighs 0."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    hi = lo + 1
    w_lo = np.where((lo >= 0) & (lo < n_in), 1.0 - frac, 0.0)
    w_hi = np.where((hi >= 0) & (hi < n_in), frac, 0.0)
    return np.clip(lo, 0, n_in - 1), np.clip(hi, 0, n_in - 1), w_lo, w_hi


def _bilinear(im: np.ndarray, dims) -> np.ndarray:
    r0, r1, a0, a1 = _resize_axis(im.shape[0], int(dims[0]))
    c0, c1, b0, b1 = _resize_axis(im.shape[1], int(dims[1]))
    rows = im[r0] * a0[:, None, None] + im[r1] * a1[:, None, None]
    return rows[:, c0] * b0[None, :, None] + rows[:, c1] * b1[None, :, None]


def _skimage():
    """scikit-image's transform module and version, or None where it is not installed."""
    try:
        import skimage  # optional (the pycaffe extra): pycaffe's own resize
        import skimage.transform  # noqa: F401  (the submodule resize lives in)
    except ImportError:
        return None
    return skimage


_NOTED: list[bool] = []


def resize_behaviour() -> str:
    """Which resize ``resize_image`` runs, in words (deploy logs it)."""
    found = _skimage()
    if found is not None:
        return f"scikit-image {found.__version__}'s resize, as pycaffe calls it"
    return ("NumPy, as scikit-image <= 0.14 resized (no anti-aliasing when shrinking; "
            "pip install 'caffe-alex[pycaffe]' for today's pycaffe numbers)")  # fmt: skip


def announce_resize() -> None:
    """Say in the log, once, which resize runs (deploy says it before its first image)."""
    _NOTED.append(True)
    get_logger().info("Resizing images with %s", resize_behaviour())


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """pycaffe's caffe.io.resize_image of an H x W x K array -> float32 (see the module's
    notes: scikit-image's resize when installed, else NumPy, order 1 only)."""
    im = np.asarray(im)
    dims = (int(new_dims[0]), int(new_dims[1]))
    skimage = _skimage()
    if skimage is None:
        if interp_order != 1:
            raise NotImplementedError(
                f"resize_image: interp_order={interp_order} needs scikit-image "
                "(pip install 'caffe-alex[pycaffe]'); without it, order 1 only"
            )
        if not _NOTED:
            announce_resize()
        return _numpy_resize(np.asarray(im, dtype=np.float64), dims)
    if im.shape[-1] not in (1, 3):  # pycaffe: scikit-image reads 1 or 3 channels only
        from scipy.ndimage import zoom  # scikit-image's own dependency

        scale = tuple(np.array(dims, dtype=float) / np.array(im.shape[:2]))
        return zoom(im, (*scale, 1), order=interp_order).astype(np.float32)
    low, high = im.min(), im.max()
    if high == low:  # a constant image: pycaffe fills instead of dividing by zero
        return np.full((*dims, im.shape[-1]), low, np.float32)
    std = (im - low) / (high - low)
    resized = skimage.transform.resize(std, dims, order=interp_order, mode="constant")
    return (resized * (high - low) + low).astype(np.float32)


def _numpy_resize(im: np.ndarray, dims) -> np.ndarray:
    low, high = im.min(), im.max()
    if high == low:
        return np.full((*dims, im.shape[-1]), low, np.float32)
    stretched = _bilinear((im - low) / (high - low), dims)
    return (np.clip(stretched, 0.0, 1.0) * (high - low) + low).astype(np.float32)


def oversample(images, crop_dims) -> np.ndarray:
    """pycaffe's caffe.io.oversample: per image the 4 corner crops and the centre crop, then
    the same 5 mirrored left-right: (10 N) x h x w x K."""
    images = np.asarray(images, dtype=np.float32)
    h, w = int(crop_dims[0]), int(crop_dims[1])
    H, W = images.shape[1:3]
    top, left = _centre_origin((H, W), (h, w))
    origins = [(0, 0), (0, W - w), (H - h, 0), (H - h, W - w), (top, left)]
    crops = np.stack([images[:, y : y + h, x : x + w] for y, x in origins], axis=1)
    crops = np.concatenate([crops, crops[:, :, :, ::-1]], axis=1)
    return crops.reshape(-1, h, w, images.shape[-1])


def _centre_origin(image_dims, crop_dims) -> tuple[int, int]:
    # pycaffe computes centre - crop/2 in floats and truncates to int
    return tuple(int(i / 2.0 - c / 2.0) for i, c in zip(image_dims, crop_dims))


def center_crop(images, crop_dims) -> np.ndarray:
    """The centre crop of each N x H x W x K image as pycaffe's Classifier takes it."""
    images = np.asarray(images, dtype=np.float32)
    top, left = _centre_origin(images.shape[1:3], crop_dims)
    return images[:, top : top + int(crop_dims[0]), left : left + int(crop_dims[1])]


# ---- Transformer ----------------------------------------------------------------------------
class Transformer:
    """pycaffe's caffe.io.Transformer: per input blob, the steps from an H x W x K image to a
    K x H x W net input. ``inputs`` maps blob names to their (N, K, H, W) shapes."""

    def __init__(self, inputs: dict[str, Sequence[int]]):
        self.inputs = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale = {}, {}, {}
        self.mean, self.input_scale = {}, {}

    def _check(self, name: str) -> None:
        if name not in self.inputs:
            raise CaffeAlexError(f"'{name}' is not one of the net inputs: {list(self.inputs)}")

    def set_transpose(self, name: str, order) -> None:
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise CaffeAlexError("the transpose order needs one entry per input axis (C, H, W)")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name: str, order) -> None:
        """Channel order taken after the transpose, e.g. (2, 1, 0) for RGB -> BGR."""
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise CaffeAlexError(
                f"the channel swap {tuple(order)} needs {self.inputs[name][1]} entries, "
                "one per input channel"
            )
        self.channel_swap[name] = list(order)

    def set_raw_scale(self, name: str, scale: float) -> None:
        self._check(name)
        self.raw_scale[name] = scale

    def set_input_scale(self, name: str, scale: float) -> None:
        self._check(name)
        self.input_scale[name] = scale

    def set_mean(self, name: str, mean) -> None:
        """Per-channel (K,) values, or a K x H x W image; an image of another size is resized
        to the input's (pycaffe's rule, which resizes rather than crops)."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        want = self.inputs[name][1:]
        if mean.ndim == 1:
            if mean.shape[0] != want[0]:
                raise CaffeAlexError(
                    f"the mean has {mean.shape[0]} channels, the input '{name}' {want[0]}"
                )
            mean = mean[:, None, None]
        else:
            mean = mean[None] if mean.ndim == 2 else mean
            if mean.ndim != 3 or mean.shape[0] != want[0]:
                raise CaffeAlexError(f"the mean's shape {mean.shape} does not fit {want}")
            if mean.shape != want:
                mean = resize_image(mean.transpose(1, 2, 0), want[1:]).transpose(2, 0, 1)
        self.mean[name] = mean

    def preprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        """H x W x K image -> K x H x W float32 net input."""
        return self.preprocess_batch(name, np.asarray(data)[None])[0]

    def preprocess_batch(self, name: str, batch: np.ndarray) -> np.ndarray:
        """N x H x W x K images -> N x K x H x W, each as ``preprocess`` does it."""
        self._check(name)
        batch = np.asarray(batch, dtype=np.float32)
        dims = self.inputs[name][2:]
        if batch.shape[1:3] != dims:
            batch = np.stack([resize_image(im, dims) for im in batch])
        if name in self.transpose:
            batch = batch.transpose(0, *(a + 1 for a in self.transpose[name]))
        if name in self.channel_swap:
            batch = batch[:, self.channel_swap[name]]
        batch = np.array(batch, dtype=np.float32)  # own contiguous copy: the steps below write
        if name in self.raw_scale:
            batch *= np.float32(self.raw_scale[name])
        if name in self.mean:
            batch -= self.mean[name]
        if name in self.input_scale:
            batch *= np.float32(self.input_scale[name])
        return batch

    def deprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        """Undo ``preprocess`` (K x H x W -> H x W x K)."""
        self._check(name)
        return self._undone(name, np.array(data, dtype=np.float32).squeeze())

    def _undone(self, name: str, out: np.ndarray) -> np.ndarray:
        """preprocess's steps undone in reverse order, on ``out`` (a copy the caller owns)."""
        if name in self.input_scale:
            out /= self.input_scale[name]
        if name in self.mean:
            out += self.mean[name]
        if name in self.raw_scale:
            out /= self.raw_scale[name]
        if name in self.channel_swap:
            out = out[np.argsort(self.channel_swap[name])]
        if name in self.transpose:
            out = out.transpose(np.argsort(self.transpose[name]))
        return out


# ---- finding and loading image files --------------------------------------------------------
def load_batches(paths: Iterable[str], batch_size: int, color: bool = True,
                 on_error: Callable[[str, str], None] | None = None) -> Iterator:  # fmt: skip
    """(names, images) batches of readable images; unreadable ones reported and skipped."""
    names, images = [], []
    for path in paths:
        try:
            images.append(load_image(path, color))
            names.append(path)
        except CaffeAlexError as exc:
            if on_error is None:
                raise
            on_error(path, str(exc))
        if len(images) == batch_size:
            yield names, images
            names, images = [], []
    if images:
        yield names, images


def expand_images(args: Iterable[str], on_error: Callable[[str, str], None]) -> list[str]:
    """Image files from files, folders (their image files, sorted) and glob patterns; an
    argument that names nothing is reported through ``on_error``. A file named explicitly is
    kept whatever its extension (its decoding decides)."""
    found: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            found += sorted(
                os.path.join(arg, f)
                for f in os.listdir(arg)
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                and os.path.isfile(os.path.join(arg, f))
            )
        elif os.path.exists(arg) or not glob.has_magic(arg):
            found.append(arg)
        else:
            matches = [m for m in sorted(glob.glob(arg, recursive=True)) if os.path.isfile(m)]
            if not matches:
                on_error(arg, f"no file matches '{arg}'")
            found += matches
    return found


# ---- writing --------------------------------------------------------------------------------
def write_png(path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write an H x W x 3 uint8 RGB image, or an H x W uint8 / uint16 map, as PNG, atomically
    (an interrupted write leaves no file under ``path``). A uint8 map with a ``palette``
    (N x 3 RGB) is stored as a paletted PNG: the pixel values stay the map's, viewers show
    the colours (as PASCAL VOC's label files)."""
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 becomes mode I;16
    if palette is not None and array.ndim == 2 and array.dtype == np.uint8:
        image.putpalette(np.asarray(palette, np.uint8)[:256].reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getvalue())


class OutputFolder:
    """A folder that deploy writes its PNGs into: created if missing and tried before any
    work (so an unusable folder is one line, before anything is written), and one file name
    per image, ``<image stem><suffix>.png``, numbered when two images share a stem."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except FileExistsError:
            raise CaffeAlexError(f"cannot write to {self.path}: not a folder") from None
        except OSError as exc:
            raise CaffeAlexError(f"cannot write to {self.path}: {describe(exc)}") from None
        self._stems: dict[str, str] = {}  # image path -> its stem here

    def file(self, image_path: str, suffix: str) -> str:
        stem = self._stems.get(image_path)
        if stem is None:
            base = os.path.splitext(os.path.basename(image_path))[0] or "image"
            taken, stem, n = set(self._stems.values()), base, 1
            while stem in taken:
                n += 1
                stem = f"{base}-{n}"
            self._stems[image_path] = stem
        return os.path.join(self.path, f"{stem}{suffix}.png")
