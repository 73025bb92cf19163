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
