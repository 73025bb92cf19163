"""Weights in Caffe's HDF5 layout (Net::ToHDF5 / CopyTrainedLayersFromHDF5): a group per layer
under ``data/`` holding datasets ``0``, ``1``, ... (blobs shared from another layer are left
out), and the same under ``diff/`` when gradients are written."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import CaffeAlexError
from .files import atomic_path
from .weightset import Blob, LayerWeights, WeightSet, note_doubles


def is_hdf5(path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def read_h5(path) -> WeightSet:
    import h5py  # imported on use: a heavy import (~0.1 s) most commands never need

    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise CaffeAlexError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
            layers = [_h5_layer(name, group) for name, group in f["data"].items()]
    except OSError as exc:
        raise CaffeAlexError(f"{path}: cannot read HDF5 weights: {exc}") from None
    note_doubles(path, layers)
    return WeightSet(layers, path, "h5")


def _h5_layer(name: str, group) -> LayerWeights:
    found = {int(k): group[k][()] for k in group if k.isdigit()}
    blobs: list[Blob | None] = [None] * (max(found) + 1 if found else 0)
    for index, array in found.items():
        array = np.asarray(array)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        blobs[index] = Blob(array.reshape(-1), tuple(array.shape))
    return LayerWeights(name, blobs=blobs)


def write_h5(path, layers, with_diffs: bool = False) -> None:
    """``layers``: (name, [(data or None if shared, diff), ...]). Caffe's layout: a group per
    layer under data/ (owned blobs only) and, with diffs, under diff/ (every blob)."""
    import h5py  # imported on use: a heavy import (~0.1 s) most commands never need

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if with_diffs else None
            for name, blobs in layers:
                group = data.create_group(name)
                dgroup = diff.create_group(name) if with_diffs else None
                for index, (array, grad) in enumerate(blobs):
                    if array is not None:
                        group.create_dataset(str(index), data=_f32(array), track_times=False)
                    if dgroup is not None:
                        dgroup.create_dataset(str(index), data=_f32(grad), track_times=False)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
