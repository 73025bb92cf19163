"""The device half of Caffe's DataTransformer, and JPEG decoding on the device.

Records travel as uint8: the crop (mirrored when drawn) that ``DataTransformer.crop_region`` cuts
where the record is read, and its draws (mirror, row offset, column offset). Here, on the batch's
device, ``(pixel - mean) * scale`` turns them into float32 with the CPU transformer's float32
operations in its order, so the numbers are the same bit for bit: the mean of a mean_file is
taken at each pixel's uncropped position (mirrored with the pixels), a mean_value per channel.

On a GPU the batch goes through a few torch kernels (the mean regions gathered in one); on a CPU
the same float32 operations run record by record in NumPy (see DeviceTransform).

``decode_jpegs`` decodes encoded Datums with torchvision's decoder on the device (nvjpeg on a
GPU), for ``make_feed(..., decode="gpu")``. nvjpeg's inverse DCT, chroma upsampling and colour
conversion are not libjpeg-turbo's, so JPEG pixels decoded on a GPU can differ from OpenCV's
(Caffe's) by a few levels; PNGs (decoded with OpenCV on the CPU) do not.
"""

from __future__ import annotations

import weakref
from collections import deque

import numpy as np
import torch

from ..errors import CaffeAlexError, describe
from .datum import ImageError, decode_image
from .transformer import DataTransformer


class DeviceTransform:
    """uint8 crops (N, C, h, w) on ``device`` + their draws (N, 3) -> float32 (N, C, h, w)."""

    def __init__(self, transformer: DataTransformer, channels: int, device, batched=None):
        self.device = torch.device(device or "cpu")
        # A GPU takes the batch in a few kernels (the mean regions gathered in one). On a CPU
        # the same float32 operations run record by record in NumPy, each record's mean region
        # staying in the cache, on one core: torch's intra-op threads stall on a small machine
        # that is busy with worker processes (measured 480 ms against 79 ms for a batch of 256
        # AlexNet crops on 2 cores). ``batched`` overrides the choice, for the tests.
        self.batched = self.device.type != "cpu" if batched is None else batched
        self.scale = np.float32(transformer.scale)
        self.mean = transformer.mean  # (C, H, W) float32, or None
        self.values = transformer.channel_means(channels)  # (C,) float32, or None
        if self.batched:
            if self.mean is not None:
                self.mean = torch.from_numpy(self.mean).to(self.device)
            if self.values is not None:
                self.values = torch.from_numpy(self.values.copy()).to(self.device).view(-1, 1, 1)
        else:
            self.outputs = Recycler()
            if self.mean is not None:  # mirrored crops read it
                self.flipped = np.ascontiguousarray(self.mean[:, :, ::-1])

    def __call__(self, pixels: torch.Tensor, draws) -> torch.Tensor:
        """``draws``: (N, 3) ints (mirror, row offset, column offset), as a tensor (on the
        device for the batched path)."""
        if not self.batched:
            return torch.from_numpy(self._records(pixels.numpy(), draws.tolist()))
        if self.mean is not None:
            out = torch.sub(pixels, self._mean_regions(pixels.shape, draws))
        elif self.values is not None:
            out = torch.sub(pixels, self.values)
        else:
            out = pixels.to(torch.float32)
        if self.scale != 1:
            out.mul_(float(self.scale))  # a float32 value: exact as a Python float
        return out

    def _records(self, pixels: np.ndarray, draws: list) -> np.ndarray:
        out = self.outputs.empty(pixels.shape, np.float32)
        h, w = pixels.shape[-2:]
        plane = None if self.values is None else self.values[:, None, None]
        for i, (mirror, y, x) in enumerate(draws):
            if self.mean is not None:
                if mirror:  # columns x + w - 1 down to x of the mean, read forwards when flipped
                    width = self.mean.shape[-1]
                    region = self.flipped[:, y : y + h, width - x - w : width - x]
                else:
                    region = self.mean[:, y : y + h, x : x + w]
                np.subtract(pixels[i], region, out=out[i])
            elif plane is not None:
                np.subtract(pixels[i], plane, out=out[i])
            else:
                out[i] = pixels[i]
            if self.scale != 1:
                np.multiply(out[i], self.scale, out=out[i])
        return out

    def _mean_regions(self, shape, draws) -> torch.Tensor:
        """(N, C, h, w) view of each record's mean region (mirrored with its pixels)."""
        h, w = shape[-2:]
        draws = torch.as_tensor(draws, device=self.device).long()
        mirror, y, x = draws[:, 0:1].bool(), draws[:, 1:2], draws[:, 2:3]
        rows = y + torch.arange(h, device=self.device)
        cols = torch.arange(w, device=self.device)
        cols = x + torch.where(mirror, w - 1 - cols, cols)
        return self.mean[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)


class Recycler:
    """Fresh-looking arrays whose memory is reused once nothing refers to them any more: a new
    150 MB batch costs more in page faults than in filling it (measured 60 against 40 ms on the
    2-core VM). Each array handed out is a new view of a kept buffer; the buffer returns to the
    free list when that view dies, which is when the last tensor over it dies (torch.from_numpy
    holds the view), so nothing a caller can still read is ever overwritten."""

    def __init__(self, keep: int = 2):
        self.free: deque = deque()  # append and pop are atomic: finalizers may run anywhere
        self.keep = keep

    def empty(self, shape, dtype) -> np.ndarray:
        buffer = None
        while self.free and buffer is None:
            candidate = self.free.pop()
            if candidate.shape == tuple(shape) and candidate.dtype == dtype:
                buffer = candidate
        if buffer is None:
            buffer = np.empty(shape, dtype)
        view = buffer.view()
        weakref.finalize(view, self._release, buffer)
        return view

    def _release(self, buffer: np.ndarray) -> None:
        if len(self.free) < self.keep:
            self.free.append(buffer)


# -- decoding on the device ---------------------------------------------------------------
def torchvision_io():
    """torchvision.io, or a one-line error saying what to install."""
    try:  # imported on use: an optional package, needed only for decode="gpu"
        import torchvision.io
    except Exception as exc:  # ImportError, or a build that does not match torch
        raise CaffeAlexError(
            f"decode='gpu' needs torchvision built for torch {torch.__version__} "
            f"(pip install torchvision); importing it failed: {describe(exc)}"
        ) from None
    return torchvision.io


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_jpegs(encoded: list[bytes], color, device, what) -> list[torch.Tensor]:
    """Encoded images -> (C, H, W) uint8 BGR tensors on ``device``. JPEGs go to torchvision's
    decoder (nvjpeg on a GPU) in one call; other formats to OpenCV on the CPU. ``color`` is
    decode_image's (True colour, False grey, None the file's own channels); EXIF orientation is
    applied where OpenCV 4 applies it (colour and grey, not the file's own channels).
    ``what(i)`` names record i in errors."""
    tvio = torchvision_io()
    mode = {True: "RGB", False: "GRAY", None: "UNCHANGED"}[color]
    jpegs = [i for i, data in enumerate(encoded) if is_jpeg(data)]
    out: list = [None] * len(encoded)
    if jpegs:
        tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            images = tvio.decode_jpeg(
                tensors,
                mode=getattr(tvio.ImageReadMode, mode),
                device=device,
                apply_exif_orientation=color is not None,
            )
        except RuntimeError as exc:
            first = what(jpegs[0])
            raise ImageError(
                f"cannot decode the JPEGs of a batch from {first} on: {describe(exc)}"
            ) from None
        for i, image in zip(jpegs, images):
            out[i] = image.flip(0) if image.shape[0] == 3 else image  # RGB -> BGR
    for i, data in enumerate(encoded):
        if out[i] is None:
            image = decode_image(data, color, what=what(i))
            out[i] = torch.from_numpy(image).to(device)
    return out


def crop_on_device(image: torch.Tensor, transformer, rng) -> tuple[torch.Tensor, tuple]:
    """A decoded (C, H, W) tensor cropped and mirrored with the host's draws (Caffe's order),
    and the draws."""
    region, draws = transformer.crop_region(image, rng)
    return (region.flip(-1) if draws[0] else region), draws
