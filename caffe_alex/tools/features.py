"""Features of named blobs, as Caffe's tools/extract_features does it.

The inputs come either from the net's own data layers (Data / ImageData / HDF5Data, fed by
caffe_alex.data.loader.make_feed, with their transform_param) or from image files preprocessed
by a deploy Classifier (resize, centre crop, Transformer). Each blob gives one row per input
item (its value after any in-place layers, as Caffe reads it). Outputs: .npy (one blob per
file), .npz and .h5 (all blobs in one file, one array / dataset per blob), or an LMDB / LevelDB
of Datums holding ``float_data`` with Caffe's legacy (channels, height, width) and keys
``%010d``, committed every 1000 records, the database created new (Caffe's db::NEW).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..data.db import open_db
from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..log import get_logger
from ..net import Net
from ..proto import caffe_pb2
from .deploy import Classifier
from .pycaffe_io import load_batches

_KINDS = {".npy": "npy", ".npz": "npz", ".h5": "h5", ".hdf5": "h5", ".lmdb": "lmdb",
          ".leveldb": "leveldb"}  # fmt: skip
_ONE_FILE = ("npz", "h5")  # kinds that hold several blobs in one file
_COMMIT_EVERY = 1000  # records per database transaction, as Caffe


def output_plan(out, blobs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{path: (kind, blobs)}: ``out`` is one path per blob (a list or comma-separated, Caffe's
    dataset names) or a single path; a single .npy / database path gets ``<stem>_<blob>``
    names when there are several blobs."""
    paths = out.split(",") if isinstance(out, str) else list(out)
    if len(paths) not in (1, len(blobs)):
        raise CaffeAlexError(f"{len(paths)} output paths for {len(blobs)} blobs")
    kinds = [_output_format(p) for p in paths]
    if len(paths) == len(blobs):
        plan: dict[str, tuple[str, list[str]]] = {}
        for path, kind, blob in zip(paths, kinds, blobs):
            plan.setdefault(path, (kind, []))[1].append(blob)
    elif kinds[0] in _ONE_FILE:
        plan = {paths[0]: (kinds[0], list(blobs))}
    else:
        stem, ext = os.path.splitext(paths[0])
        plan = {f"{stem}_{b.replace('/', '_')}{ext}": (kinds[0], [b]) for b in blobs}
    for path, (kind, names) in plan.items():
        if kind not in _ONE_FILE and len(names) > 1:
            raise CaffeAlexError(f"'{path}' ({kind}) holds one blob, but {names} go there")
        if kind in ("lmdb", "leveldb") and os.path.exists(path):
            raise CaffeAlexError(f"database '{path}' already exists (remove it or choose another)")
    return plan


def _output_format(path: str) -> str:
    kind = _KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise CaffeAlexError(
            f"cannot tell the output format of '{path}': name it .npy, .npz, .h5, .lmdb or .leveldb"
        )
    return kind


def extract_features(model, blobs, out=None, *, images=None, num_batches=None,
                     device=None, workers=0, on_error=None) -> dict[str, np.ndarray]:  # fmt: skip
    """{blob: N x ...} features, written to ``out`` (see output_plan) when given.

    ``model`` is a Net (its data layers are read, ``num_batches`` batches, default one pass
    over the first layer's records) or a deploy Classifier; with ``images`` (paths) they are
    preprocessed by the Classifier (a bare Net gets one: resize to the input, nothing else),
    unreadable files go to ``on_error(path, message)``, and ``num_batches`` limits the batches.
    ``device`` defaults to the Classifier's, or the CPU.
    """
    blobs = [blobs] if isinstance(blobs, str) else list(blobs)
    net = model.net if isinstance(model, Classifier) else model
    if not isinstance(net, Net):
        raise TypeError("model must be a caffe_alex Net or a deploy Classifier")
    unknown = [b for b in blobs if b not in net.blob_shapes]
    if unknown:
        raise CaffeAlexError(
            f"unknown feature blob(s) {unknown} in the net; its blobs: {list(net.blob_shapes)}"
        )
    plan = output_plan(out, blobs) if out is not None else None
    if images is not None:
        clf = model if isinstance(model, Classifier) else Classifier(net, device=device or "cpu")
        features = _from_images(clf, blobs, images, num_batches, on_error)
    else:
        features = _from_data_layers(net, blobs, num_batches, device, workers)
    if plan is not None:
        write_features(features, plan)
    return features


def _from_images(clf, blobs, paths, num_batches, on_error) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {b: [] for b in blobs}
    batches = load_batches(paths, clf.batch_size, clf.channels != 1, on_error)
    for index, (_, images) in enumerate(batches):
        if num_batches is not None and index >= num_batches:
            break
        got = clf.forward_all(clf.prepare(images, oversample=False), blobs)
        for b in blobs:
            parts[b].append(got[b])
    return {b: _join(p, net_shape=clf.net.blob_shapes[b]) for b, p in parts.items()}


def _join(parts, net_shape) -> np.ndarray:
    if parts:
        return np.concatenate(parts)
    return np.zeros((0, *net_shape[1:]), np.float32)


@torch.inference_mode()
def _from_data_layers(net, blobs, num_batches, device, workers) -> dict[str, np.ndarray]:
    if device is None:  # stay where the net is
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
    device = torch.device(device)
    net.to(device).eval()
    feed = make_feed(net, device=device, workers=workers)
    if not feed.layers:
        raise CaffeAlexError("the net has no data layer to read; give images instead")
    first = feed.layers[0]
    records = len(first.source)
    count = num_batches if num_batches is not None else math.ceil(records / first.batch)
    parts: dict[str, list[np.ndarray]] = {b: [] for b in blobs}
    try:
        for _ in range(count):
            net(**next(feed))
            for b in blobs:
                parts[b].append(net.blobs[b].float().cpu().numpy())
    finally:
        feed.close()
    rows = None if num_batches is not None else records  # one pass: each record once
    return {b: _join(p, net.blob_shapes[b])[:rows] for b, p in parts.items()}


# ---- writing --------------------------------------------------------------------------------
def write_features(features: dict[str, np.ndarray], plan) -> None:
    """Write ``features`` as ``output_plan`` says (a plan, or an ``out`` value)."""
    if not isinstance(plan, dict):
        plan = output_plan(plan, list(features))
    log = get_logger().info
    for path, (kind, names) in plan.items():
        if kind in ("lmdb", "leveldb"):
            _write_db(path, kind, features[names[0]])  # a new database: written beside, moved
        else:  # written beside the path and renamed: never a partial file under the name
            with atomic_path(path) as tmp:
                if kind == "h5":
                    _write_h5(tmp, {n: features[n] for n in names})
                else:
                    with open(tmp, "wb") as f:  # a file object: numpy adds no extension
                        if kind == "npy":
                            np.save(f, features[names[0]])
                        else:
                            np.savez(f, **{n: features[n] for n in names})
        log("Extracted features of %d items for blob(s) %s into %s", len(features[names[0]]),
            ", ".join(names), path)  # fmt: skip


def _write_h5(path: str, arrays: dict[str, np.ndarray]) -> None:
    import h5py  # imported on use: a heavy import only .h5 output needs

    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)


def legacy_chw(shape) -> tuple[int, int, int]:
    """Caffe's Blob channels(), height(), width() of an N x ... blob (missing axes are 1)."""
    if len(shape) > 4:
        raise CaffeAlexError(f"a Datum holds at most 4-D blobs (N, C, H, W), got {tuple(shape)}")
    dims = list(shape[1:]) + [1] * (4 - max(len(shape), 1))
    return tuple(int(d) for d in dims[:3])


def _write_db(path: str, backend: str, array: np.ndarray) -> None:
    channels, height, width = legacy_chw(array.shape)
    with open_db(path, backend, mode="new") as db:
        txn = db.transaction()
        for index, row in enumerate(array):
            datum = caffe_pb2.Datum(channels=channels, height=height, width=width)
            datum.float_data.extend(np.asarray(row, np.float32).ravel().tolist())
            txn.put(f"{index:010d}", datum.SerializeToString())
            if (index + 1) % _COMMIT_EVERY == 0:
                txn.commit()
        txn.commit()
