"""The in-memory form of a weights file, whatever its format: layers in file order, each with
its blobs as numpy arrays (and its definition, where the format stores one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import CaffeAlexError
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger()


@dataclass
class Blob:
    """One stored blob: its data array (float32, or float64 from ``double_data``) and shape.

    ``legacy`` marks a shape given as num/channels/height/width (matched by trailing dims).
    """

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool = False
    diff: np.ndarray | None = None


@dataclass
class LayerWeights:
    """A layer of a weights file: its name, type, blobs (None = absent in an HDF5 file), and
    the layer's definition without blobs where the format stores one."""

    name: str
    type: str = ""
    blobs: list[Blob | None] = field(default_factory=list)
    param: caffe_pb2.LayerParameter | None = None


@dataclass
class WeightSet:
    """The layers of one weights file, in file order."""

    layers: list[LayerWeights]
    path: str | None = None
    format: str = "caffemodel"  # or "h5", "pt", "safetensors"
    version: str = "current"  # V0, V1 or current (caffemodel)
    net_name: str = ""

    def has_definitions(self) -> bool:
        return all(lw.param is not None for lw in self.layers)


# A damaged file may name any blob index: these bound what reading one can allocate. No Caffe
# layer has nearly 1024 blobs, nor a net 65536 blobs left out of a file as shared.
MAX_BLOBS = 1024
MAX_LEFT_OUT = 1 << 16


def text_of(value) -> str:
    """A protobuf string field as str. Caffe (C++ protobuf, proto2) stores any bytes there and
    Python's protobuf then gives bytes: those that are not UTF-8 become lone surrogates
    ('surrogateescape'), so the original bytes can be had back and names still compare."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


def shown(name: str) -> str:
    """A name for messages and listings: bytes that are not UTF-8 as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def blob_lists(path, found: dict[str, dict[int, Blob]]) -> dict[str, list[Blob | None]]:
    """Each layer's blobs as a list by index (None where a blob is not stored), from the
    (layer -> {index: blob}) of a file that names blobs by index (HDF5, PyTorch files); indices
    past what any net has are refused before anything is allocated."""
    left_out = 0
    for name, blobs in found.items():
        for index in blobs:
            if not 0 <= index < MAX_BLOBS:
                number = index if abs(index) < 10**18 else f"of {index.bit_length()} bits"
                raise CaffeAlexError(
                    f"{path}: layer '{shown(name)}': blob index {number} is out of range "
                    f"(0 to {MAX_BLOBS - 1})"
                )
        left_out += (max(blobs) + 1 - len(blobs)) if blobs else 0
    if left_out > MAX_LEFT_OUT:
        raise CaffeAlexError(
            f"{path}: the blob indices leave {left_out} blobs out (more than {MAX_LEFT_OUT})"
        )
    return {
        name: [blobs.get(i) for i in range(max(blobs) + 1 if blobs else 0)]
        for name, blobs in found.items()
    }


def note_doubles(path, layers) -> None:
    if any(b is not None and b.data.dtype == np.float64 for lw in layers for b in lw.blobs):
        log.info("%s: blobs stored as double_data are converted to float32", path)


FORMATS = {
    ".caffemodel": "caffemodel",
    ".h5": "h5",
    ".hdf5": "h5",
    ".pt": "pt",
    ".pth": "pt",
    ".safetensors": "safetensors",
    ".binaryproto": "binaryproto",
    ".npy": "npy",
}


def format_of(path) -> str:
    lower = os.fspath(path).lower()
    for ext, kind in FORMATS.items():
        if lower.endswith(ext):
            return kind
    known = ", ".join(FORMATS)
    raise CaffeAlexError(f"{os.fspath(path)}: unknown weights format (extensions: {known})")


def spec_owners(ws: WeightSet) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer position, blob) -> owner's, from ParamSpec names (first use owns, as Caffe)."""
    owners, first = {}, {}
    for i, lw in enumerate(ws.layers):
        for j, spec in enumerate(lw.param.param if lw.param is not None else []):
            if spec.name and j < len(lw.blobs):
                if spec.name in first:
                    owners[(i, j)] = first[spec.name]
                else:
                    first[spec.name] = (i, j)
    return owners
