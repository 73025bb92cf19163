"""Weights in Caffe's HDF5 layout (Net::ToHDF5 / CopyTrainedLayersFromHDF5): a group per layer
under ``data/`` holding datasets ``0``, ``1``, ... (blobs shared from another layer are left
out), and the same under ``diff/`` when gradients are written."""

from __future__ import annotations

import contextlib
import math
import os
import re

import numpy as np

from ..errors import CaffeAlexError, describe
from .atomic import atomic_path
from .file_errors import regular_file
from .weightset import Blob, LayerWeights, WeightSet, blob_lists, note_doubles, shown, text_of


def is_hdf5(path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


@contextlib.contextmanager
def reading_h5(path: str, missing: str, what: str):
    """h5py's many exception types while reading ``path`` as one line: ``missing`` when there
    is no such file, else ``{path}: {what}: {reason}``; our own errors pass through."""
    try:
        yield
    except CaffeAlexError:
        raise
    except FileNotFoundError:
        raise CaffeAlexError(missing) from None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:  # h5py's errors
        raise CaffeAlexError(f"{path}: {what}: {describe(exc)}") from None


def read_h5(path) -> WeightSet:
    import h5py  # imported on use: a heavy import (~0.1 s) most commands never need

    path = regular_file(path)
    with reading_h5(path, f"no such file: {path}", "cannot read HDF5 weights"):
        with h5py.File(path, "r") as f:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                raise CaffeAlexError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
            found: dict[str, dict[int, Blob]] = {}
            for key in data:  # h5py gives a name that is not UTF-8 as bytes
                _h5_layer(path, text_of(key), data.get(key), h5py, found, 1)
    layers = [LayerWeights(name, blobs=blobs) for name, blobs in blob_lists(path, found).items()]
    note_doubles(path, layers)
    return WeightSet(layers, path, "h5")


_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")  # the names Caffe gives blobs: str(index)
_INT_MAX = 2**31 - 1  # Caffe's limit on a blob's count


_MAX_DEPTH = 32  # groups within groups: a layer name of more parts than this is refused


def _h5_layer(path: str, name: str, group, h5py, found: dict, depth: int) -> None:
    """The layer ``name``'s group: its datasets are its blobs; its groups, layers whose names
    go on after a '/' (HDF5 keeps a name 'a/b' as group b in group a)."""
    if not isinstance(group, h5py.Group):
        raise CaffeAlexError(f"{path}: data/{shown(name)} is not a group of blobs")
    if depth > _MAX_DEPTH:
        raise CaffeAlexError(f"{path}: data/ holds groups nested more than {_MAX_DEPTH} deep")
    keys = list(group)
    inner = [k for k in keys if isinstance(group.get(k), h5py.Group)]
    if len(inner) < len(keys) or not keys:  # (a group of groups only is a path, not a layer)
        found[name] = _h5_blobs(path, f"data/{shown(name)}", group, h5py, skip=inner)
    for key in inner:
        _h5_layer(path, f"{name}/{text_of(key)}", group.get(key), h5py, found, depth + 1)


def _h5_blobs(path: str, where: str, group, h5py, skip=()) -> dict[int, Blob]:
    """A layer's group: datasets named by blob index, holding numbers."""
    blobs = {}
    for key in group:
        if key in skip:
            continue
        item = group.get(key)
        if isinstance(key, bytes) or not _INDEX.fullmatch(key):
            raise CaffeAlexError(f"{path}: {where}/{shown(text_of(key))}: not a blob index "
                                 "(Caffe names a layer's blobs 0, 1, ...)")  # fmt: skip
        if not isinstance(item, h5py.Dataset):
            raise CaffeAlexError(f"{path}: {where}/{key} is not a dataset")
        if item.dtype.kind not in "fiub":
            raise CaffeAlexError(f"{path}: {where}/{key} holds {_dtype_name(item.dtype)} "
                                 "values, not numbers")  # fmt: skip
        if item.shape is None:
            raise CaffeAlexError(f"{path}: {where}/{key} holds no data (a null dataspace)")
        count = math.prod(item.shape)
        if count > _INT_MAX:
            raise CaffeAlexError(f"{path}: {where}/{key} of shape {list(item.shape)} holds "
                                 f"{count} values, more than a blob can ({_INT_MAX})")  # fmt: skip
        try:
            array = np.asarray(item[()])
        except MemoryError:
            raise CaffeAlexError(f"{path}: {where}/{key} of shape {list(item.shape)} does not "
                                 "fit in memory") from None  # fmt: skip
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        blobs[int(key)] = Blob(array.reshape(-1), tuple(int(d) for d in array.shape))
    return blobs


def _dtype_name(dtype) -> str:
    if dtype.kind in "SUO":
        return "string"
    if dtype.kind == "c":
        return "complex"
    return "compound" if dtype.names else str(dtype)


def write_h5(path, layers, with_diffs: bool = False) -> None:
    """``layers``: (name, [(data or None if shared, diff), ...]). Caffe's layout: a group per
    layer under data/ (owned blobs only) and, with diffs, under diff/ (every blob)."""
    import h5py  # imported on use: a heavy import (~0.1 s) most commands never need

    layers = list(layers)
    _check_group_names(path, [name for name, _ in layers])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if with_diffs else None
            for name, blobs in layers:
                group = _group(path, data, name, h5py)
                dgroup = _group(path, diff, name, h5py) if with_diffs else None
                for index, (array, grad) in enumerate(blobs):
                    if array is not None:
                        group.create_dataset(str(index), data=_f32(array), track_times=False)
                    if dgroup is not None:
                        dgroup.create_dataset(str(index), data=_f32(grad), track_times=False)


def _check_group_names(path, names) -> None:
    # a group per layer, by name ('/' makes nested groups, as the reader expects): a name must
    # be a relative HDF5 path, and name one layer only
    seen = set()
    for name in names:
        if "\0" in name or any(part in ("", ".") for part in name.split("/")):
            raise CaffeAlexError(f"cannot write {os.fspath(path)}: the layer name "
                                 f"'{shown(name)}' cannot name an HDF5 group")  # fmt: skip
        if name in seen:
            raise CaffeAlexError(f"cannot write {os.fspath(path)}: two layers are named "
                                 f"'{shown(name)}' (HDF5 keeps one group per name)")  # fmt: skip
        seen.add(name)


def _group(path, parent, name: str, h5py):
    """The group of layer ``name`` under ``parent``, made part by part ('a' may exist already,
    made for an earlier 'a/b')."""
    for part in name.split("/"):
        raw = _h5_name(part)
        try:
            parent = parent.create_group(raw)
        except ValueError:  # there already
            parent = parent[raw]
        if not isinstance(parent, h5py.Group):
            raise CaffeAlexError(f"cannot write {os.fspath(path)}: the layer name "
                                 f"'{shown(name)}' is also a blob's dataset")  # fmt: skip
    return parent


def _h5_name(name: str):
    # a name read from a caffemodel may hold bytes that are not UTF-8 (see text_of): HDF5 takes
    # any bytes, h5py takes them as bytes
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape")
    return name


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
