"""Weights files of every format, by extension or content: reading them into a WeightSet,
copying them into a net with Caffe's Net::CopyTrainedLayersFrom rules, writing a net's blobs
back, and converting between formats (``caffe-alex convert``).

The net is taken as it is given (layer names, modules with ``blobs``, ``param_infos``): this
module does not import the builder.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CaffeAlexError, describe, reading
from ..log import get_logger
from .atomic import atomic_path
from .caffemodel import (
    net_layer_params,
    read_binaryproto,
    read_caffemodel,
    weightset_layers,
    write_binaryproto,
    write_caffemodel,
)
from .file_errors import regular_file
from .hdf5 import is_hdf5, read_h5, write_h5
from .torch_weights import read_torch_weights, save_net_torch, weightset_to_torch
from .weightset import Blob, LayerWeights, WeightSet, format_of, shown, spec_owners
from .wire import WireError, blob_count

log = get_logger()


@dataclass
class LoadReport:
    """What load_weights did: layers copied, file layers the net lacks (ignored, as Caffe
    does), and net layers with blobs that no file gave weights (they keep their fillers)."""

    files: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def read_weights(path) -> WeightSet:
    """Any weights file, by content (HDF5) or extension (.pt/.pth, .safetensors)."""
    path = regular_file(path)
    lower = path.lower()
    if lower.endswith((".pt", ".pth", ".safetensors")):
        return read_torch_weights(path)
    if is_hdf5(path):
        return read_h5(path)
    return read_caffemodel(path)


def _legacy_match(target: tuple[int, ...], blob: Blob) -> bool:
    # Blob::ShapeEquals: legacy blobs were indexed from the end (a bias was 1x1x1xN), so a
    # num/channels/height/width blob matches when the net's shape, left-padded to 4-D, agrees.
    if not blob.legacy:
        return target == blob.shape
    return len(target) <= 4 and (1,) * (4 - len(target)) + target == blob.shape


def _fork_layout(module, index: int, blob: Blob) -> bool:
    # A layer may read another fork's layout of the same values (yjxiong's [1, C] BN blobs).
    accepts = getattr(module, "accepts_blob_shape", None)
    return bool(accepts and accepts(index, blob.shape))


def _net_file(net) -> str:
    return getattr(getattr(net, "source", None), "path", None) or "the net definition"


def _plan_copies(net, ws: WeightSet, plan: dict, report: LoadReport) -> None:
    """Check every layer of ``ws`` against the net (Caffe's CopyTrainedLayersFrom rules) and
    record the copies in ``plan`` (one per parameter object: shared blobs load once, the last
    layer giving one wins, as Caffe's repeated copies end)."""
    first = {}
    for i, name in enumerate(net.layer_names):
        first.setdefault(name, i)
    by_key = dict(zip(net.layers.keys(), net.layer_names)) if ws.format == "keyed" else None
    shared = {(p.layer, p.index) for p in net.param_infos if p.owner is not None}
    for lw in ws.layers:
        name = by_key.get(lw.name, lw.name) if by_key else lw.name
        if name not in first:
            log.info("Ignoring source layer %s", shown(name))
            report.ignored.append(name)
            continue
        module = net.layer(name)
        targets = list(module.blobs)
        _check_count(name, lw, targets, ws, net, shared, module)
        for j, (param, blob) in enumerate(zip(targets, lw.blobs)):
            if blob is None:
                continue
            target = tuple(param.shape)
            if not _legacy_match(target, blob) and not _fork_layout(module, j, blob):
                raise CaffeAlexError(
                    f"cannot copy blob {j} of layer '{name}': shape {list(blob.shape)} in "
                    f"{ws.path} but {list(target)} in the net ({_net_file(net)}); to learn "
                    "this layer from scratch instead, rename it"
                )
            plan[id(param)] = (param, blob)
        if any(b is not None for b in lw.blobs):
            report.loaded.append(name)


def _check_count(name, lw: LayerWeights, targets, ws, net, shared, module) -> None:
    given = len(lw.blobs)
    # HDF5 files leave out blobs shared from another layer; every other blob must be there
    absent = [j for j, b in enumerate(lw.blobs) if b is None] + list(range(given, len(targets)))
    ok = given == len(targets)
    if ws.format == "h5":
        ok = given <= len(targets) and all((name, j) in shared for j in absent)
    if not ok:
        note = module.blob_count_note() if hasattr(module, "blob_count_note") else ""
        raise CaffeAlexError(
            f"incompatible number of blobs for layer '{name}': {given} in {ws.path}, "
            f"{len(targets)} in the net ({_net_file(net)})" + (f"; {note}" if note else "")
        )


def _copy(param, blob: Blob) -> None:
    array = blob.data.reshape(tuple(param.shape))
    with torch.no_grad():
        if param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64):
            np.copyto(param.detach().numpy(), array, casting="same_kind")
        else:
            param.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))


def load_weights(net, paths) -> LoadReport:
    """Net.load_weights: copy the weights of each file in order (a comma-separated string or
    a list), by layer name, checking every shape before anything is copied from a file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in os.fspath(paths).split(",") if p]
    report, given = LoadReport(), set()
    for path in paths:
        ws = read_weights(path)
        plan: dict = {}
        _plan_copies(net, ws, plan, report)
        for param, blob in plan.values():
            _copy(param, blob)
        report.files.append(os.fspath(path))
        given.update(report.loaded)
        log.info("Copied weights of %d layers from %s", len(set(report.loaded)), path)
    with_blobs = [n for n in net.layer_names if len(net.layer(n).blobs)]
    report.missing = [n for n in with_blobs if n not in given]
    if report.missing:
        log.warning("Layers without weights in %s (fillers kept): %s", ",".join(report.files),
                    ", ".join(report.missing))  # fmt: skip
    return report


def _array(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _grad(param) -> np.ndarray:
    return _array(param.grad) if param.grad is not None else np.zeros(param.shape, np.float32)


def save_weights(net, path, *, with_diffs: bool = False, kind: str | None = None) -> None:
    """Net.save_weights: .caffemodel (Net::ToProto), .h5 (Net::ToHDF5), .pt or .safetensors,
    by extension unless ``kind`` ("caffemodel" or "h5") says which."""
    path = os.fspath(path)
    lower = path.lower()
    if kind is None and lower.endswith((".pt", ".pth", ".safetensors")):
        return save_net_torch(net, path)
    layers = list(zip(net_layer_params(net), net.layer_names, net.layers.values()))
    if kind == "h5" or (kind is None and lower.endswith((".h5", ".hdf5"))):
        owned = {(p.layer, p.index) for p in net.param_infos if p.owner is None}
        entries = [
            (
                name,
                [
                    (_array(p) if (name, j) in owned else None, _grad(p))
                    for j, p in enumerate(module.blobs)
                ],
            )  # fmt: skip
            for _, name, module in layers
        ]
        return write_h5(path, entries, with_diffs)
    pairs = (
        (lp, [(_array(p), _grad(p) if with_diffs else None) for p in module.blobs])
        for lp, _, module in layers
    )
    write_caffemodel(path, net.name, pairs)


# ---- converting files ----------------------------------------------------------------------


def write_weightset(ws: WeightSet, dst, *, with_diffs: bool = False) -> None:
    kind = format_of(dst)
    if kind in ("pt", "safetensors"):
        return weightset_to_torch(ws, dst)
    if any(b is None for lw in ws.layers for b in lw.blobs) and kind == "caffemodel":
        raise CaffeAlexError(f"{ws.path}: some blobs are stored once for shared parameters; "
                             "give the net definition (--model) to write a caffemodel")  # fmt: skip
    if kind == "caffemodel":
        layers = weightset_layers(ws)
        if not with_diffs:
            layers = ((lp, [(d, None) for d, _ in blobs]) for lp, blobs in layers)
        return write_caffemodel(dst, ws.net_name, layers)
    if kind == "h5":
        owners = spec_owners(ws)
        entries = [
            (
                lw.name,
                [
                    (None if b is None or (i, j) in owners else b.data.reshape(b.shape), None)
                    for j, b in enumerate(lw.blobs)
                ],
            )  # fmt: skip
            for i, lw in enumerate(ws.layers)
        ]
        return write_h5(dst, entries)
    raise CaffeAlexError(f"cannot convert weights to a .{kind} file")


def convert(src, dst, *, net=None, with_diffs: bool = False) -> str:
    """Convert ``src`` to ``dst`` (formats by extension); returns a one-line summary.

    With ``net`` (a built Net), the weights go through it (shapes checked, the net's layer
    definitions written); without, straight from file to file where the target format does
    not need the definitions.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    kinds = format_of(src), format_of(dst)
    if "binaryproto" in kinds or "npy" in kinds:
        return _convert_mean(src, dst, kinds)
    if net is not None:
        report = load_weights(net, [src])
        save_weights(net, dst, with_diffs=with_diffs)
        return f"{dst}: {len(report.loaded)} layers from {src} through {_net_file(net)}"
    ws = read_weights(src)
    write_weightset(ws, dst, with_diffs=with_diffs)
    return f"{dst}: {len(ws.layers)} layers from {src}"


def _convert_mean(src, dst, kinds) -> str:
    if kinds == ("binaryproto", "npy"):
        array = read_binaryproto(src)
        with atomic_path(dst) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    elif kinds == ("npy", "binaryproto"):
        array = _read_npy(src)
        write_binaryproto(dst, array)
    else:
        raise CaffeAlexError("mean files convert between .binaryproto and .npy only")
    return f"{dst}: array of shape {list(array.shape)} from {src}"


def _read_npy(path) -> np.ndarray:
    """A .npy file of numbers that fits a BlobProto; mapped first, so that a header declaring
    a huge array is refused before anything is allocated."""
    with reading(regular_file(path)):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CaffeAlexError(f"{path}: not a readable .npy file: {describe(exc)}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise CaffeAlexError(f"{path}: not a .npy file (an archive of several arrays?)")
    if array.dtype.kind not in "fiub":
        raise CaffeAlexError(f"{path}: holds {array.dtype} values, not numbers")
    try:
        blob_count(array.shape)
    except WireError as exc:
        raise CaffeAlexError(f"{path}: {exc.reason}") from None
    if array.size == 0:
        raise CaffeAlexError(f"{path}: the array of shape {list(array.shape)} holds no values")
    return np.array(array)
