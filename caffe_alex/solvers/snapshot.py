"""Solver state files: Caffe's ``.solverstate`` (a binary SolverState: iter 1, learned_net 2,
history 3 as BlobProtos, current_step 4) and ``.solverstate.h5`` (SnapshotSolverStateToHDF5:
int datasets ``iter`` and ``current_step`` of shape (1,), the string ``learned_net``, and
``history/0..n-1``), plus the data position, which Caffe does not keep: a JSON file beside the
state (``<prefix>_iter_N.solverstate.data.json``, for both formats) holding each feed's state
and torch's RNG state, so that a resumed run draws the same batches and dropout masks.

History blobs are written and read through caffe_alex.formats.wire's helpers: building a
SolverState with the generated classes would hold every float as a Python object.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CaffeAlexError, describe
from ..formats.atomic import atomic_path
from ..formats.hdf5 import is_hdf5, reading_h5
from ..formats.weightset import text_of
from ..formats.wire import (
    WireError,
    blob_count,
    blob_pieces,
    encode_varint,
    fields,
    key,
    length_delimited,
    map_file,
    parse_blob,
    varint,
)


@dataclass
class SolverState:
    iter: int = 0
    current_step: int = 0
    learned_net: str | None = None
    history: list[np.ndarray] = field(default_factory=list)


def _history_pieces(array: np.ndarray) -> list:
    pieces = blob_pieces(np.asarray(array, dtype=np.float32), None)
    head = pieces[0]  # key of LayerParameter.blobs (7) + length: make it SolverState.history (3)
    _, pos = varint(head, 0, len(head))
    return [key(3, 2) + head[pos:]] + pieces[1:]


def write_binary(path, state: SolverState) -> None:
    """Atomically write a binary SolverState, fields in number order as C++ serializes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(key(1, 0) + encode_varint(state.iter))
        if state.learned_net is not None:
            f.write(length_delimited(2, state.learned_net.encode()))
        for array in state.history:
            for piece in _history_pieces(array):
                f.write(piece)
        f.write(key(4, 0) + encode_varint(state.current_step))


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF  # an int32 field keeps the varint's low 32 bits, as protobuf reads it
    return value - (1 << 32) if value >= 1 << 31 else value


def _learned_net(raw: bytes) -> str:
    # a path: Caffe takes any bytes, and so does the file system (surrogateescape keeps them)
    if b"\0" in raw:
        raise WireError("learned_net holds a NUL byte", 0)
    return raw.decode("utf-8", "surrogateescape")


def read_binary(path) -> SolverState:
    path = os.fspath(path)
    buf, size = map_file(path)
    state = SolverState()
    try:
        for number, wire, s, e, _ in fields(buf, 0, size):
            if number in (1, 4) and wire == 0:
                value = _int32(varint(buf, s, e)[0])
                setattr(state, "iter" if number == 1 else "current_step", value)
            elif number == 2 and wire == 2:
                state.learned_net = _learned_net(bytes(buf[s:e]))
            elif number == 3 and wire == 2:
                blob = parse_blob(buf, s, e)
                state.history.append(np.array(blob.data, np.float32).reshape(blob.shape))
            else:
                raise WireError(f"unexpected field {number}", s)
    except WireError as exc:
        raise CaffeAlexError(f"{path}: not a solver state (SolverState): {exc.reason}") from None
    _check_counters(path, state)
    return state


def _check_counters(path: str, state: SolverState) -> None:
    for name in ("iter", "current_step"):
        if getattr(state, name) < 0:
            raise CaffeAlexError(f"{path}: {name} is {getattr(state, name)}, not a count")


def write_hdf5(path, state: SolverState) -> None:
    import h5py  # imported on use: only HDF5 snapshots need it

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("iter", data=np.array([state.iter], np.int32))
        if state.learned_net is not None:
            _string_dataset(f, "learned_net", state.learned_net)
        f.create_dataset("current_step", data=np.array([state.current_step], np.int32))
        group = f.create_group("history")
        for i, array in enumerate(state.history):
            group.create_dataset(str(i), data=np.ascontiguousarray(array, np.float32))


def _string_dataset(f, name: str, text: str) -> None:
    # H5LTmake_dataset_string: a scalar, fixed-length, NUL-terminated C string
    import h5py  # imported on use: only HDF5 snapshots need it

    raw = text.encode() + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dset = h5py.h5d.create(f.id, name.encode(), tid, space)
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"))


def read_hdf5(path) -> SolverState:
    import h5py  # imported on use: only HDF5 snapshots need it

    path = os.fspath(path)
    missing = f"no such solver state file: {path}"
    with reading_h5(path, missing, "not a solver state (HDF5)"):
        with h5py.File(path, "r") as f:
            state = SolverState(_h5_int(path, f, "iter", h5py),
                                _h5_int(path, f, "current_step", h5py))  # fmt: skip
            if "learned_net" in f:
                state.learned_net = _h5_text(path, f, "learned_net", h5py)
            history = f.get("history")
            if not isinstance(history, h5py.Group):
                raise CaffeAlexError(f"{path}: not a solver state (HDF5): no 'history' group")
            names = set(history)
            if names != {str(i) for i in range(len(names))}:
                shown_names = sorted(text_of(n) for n in names)[:5]
                raise CaffeAlexError(f"{path}: the history datasets are {shown_names}, "
                                     "not 0, 1, ...")  # fmt: skip
            state.history = [_h5_array(path, history.get(str(i)), f"history/{i}", h5py)
                             for i in range(len(names))]  # fmt: skip
    _check_counters(path, state)
    return state


def _h5_dataset(path, f, name, h5py):
    item = f.get(name)
    if not isinstance(item, h5py.Dataset) or item.shape is None:
        raise CaffeAlexError(f"{path}: not a solver state (HDF5): '{name}' is not a dataset")
    return item


def _h5_int(path, f, name, h5py) -> int:
    # Caffe reads these with H5LTread_dataset_int: one number, converted to int
    item = _h5_dataset(path, f, name, h5py)
    if item.dtype.kind not in "iuf" or item.size != 1:
        raise CaffeAlexError(f"{path}: '{name}' is not one number")
    value = np.ravel(item[()])[0]
    if not np.isfinite(value) or value != int(value) or not -(2**31) <= value < 2**31:
        raise CaffeAlexError(f"{path}: '{name}' is {value}, not an int32")
    return int(value)


def _h5_text(path, f, name, h5py) -> str:
    item = _h5_dataset(path, f, name, h5py)
    if item.dtype.kind not in "SOU" or item.size != 1:
        raise CaffeAlexError(f"{path}: '{name}' is not a string")
    raw = np.ravel(item[()])[0]
    raw = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if not isinstance(raw, bytes):
        raise CaffeAlexError(f"{path}: '{name}' is not a string")
    try:
        return _learned_net(raw.rstrip(b"\0"))
    except WireError as exc:
        raise CaffeAlexError(f"{path}: {exc.reason}") from None


def _h5_array(path, item, name, h5py) -> np.ndarray:
    if not isinstance(item, h5py.Dataset) or item.shape is None:
        raise CaffeAlexError(f"{path}: '{name}' is not a dataset")
    if item.dtype.kind not in "fiu":
        raise CaffeAlexError(f"{path}: '{name}' does not hold numbers")
    try:
        blob_count(item.shape)
        return np.asarray(item[()], np.float32)
    except WireError as exc:
        raise CaffeAlexError(f"{path}: '{name}': {exc.reason}") from None
    except MemoryError:
        raise CaffeAlexError(f"{path}: '{name}' of shape {list(item.shape)} does not fit in "
                             "memory") from None  # fmt: skip


def read_state(path) -> SolverState:
    """Either format; like Caffe, a name ending in .h5 means HDF5 (and the content decides when
    the two disagree)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CaffeAlexError(f"no such solver state file: {path}")
    return read_hdf5(path) if is_hdf5(path) else read_binary(path)


# ---- the data position (not part of Caffe's state) ------------------------------------------


def data_state_path(state_path) -> str:
    base = os.fspath(state_path)
    if base.endswith(".h5"):
        base = base[:-3]
    return base + ".data.json"


def _rng_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _rng_from_text(text: str) -> torch.Tensor:
    if not isinstance(text, str):
        raise TypeError("not text")
    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), np.uint8).copy())


def write_data_state(path, feeds: dict, device: torch.device | None) -> None:
    """feeds: {"train": state or None, "test": [state or None, ...]}."""
    doc = {"version": 1, "feeds": feeds, "torch_rng": _rng_to_text(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        doc["cuda_rng"] = _rng_to_text(torch.cuda.get_rng_state(device))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f)


def read_data_state(path) -> dict | None:
    """The data position saved beside a state, checked (None when there is none)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as exc:
        raise CaffeAlexError(f"{path}: cannot read the saved data position: "
                             f"{describe(exc)}") from None  # fmt: skip
    problem = _data_state_problem(doc)
    if problem:
        raise CaffeAlexError(f"{path}: not a saved data position: {problem}")
    return doc


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**63


def _feed_problem(saved, where: str) -> str | None:
    """What is wrong with a feed's saved state (solvers.feeds and data.loader write them)."""
    if not isinstance(saved, dict) or not _count(saved.get("batches")):
        return f"{where} has no batch count"
    inner = saved.get("state")
    if inner is None:
        return None
    if not isinstance(inner, dict):
        return f"{where}: its state is not a map"
    for name, low in (("position", 0), ("seed", 0), ("rank", 0), ("world_size", 1)):
        if not _count(inner.get(name), low):  # data.loader's Feed.state
            return f"{where}: {name} is not a count"
    if inner["rank"] >= inner["world_size"]:
        return f"{where}: rank {inner['rank']} of a world of {inner['world_size']}"
    return None


def _rng_problem(doc: dict, where: str) -> str | None:
    """What is wrong with the generator states (base64 text) in ``doc``, if anything."""
    for name in ("torch_rng", "cuda_rng"):
        if name not in doc and name == "cuda_rng":
            continue
        try:
            state = _rng_from_text(doc.get(name))
        except (TypeError, ValueError, binascii.Error):
            return f"{where}{name} is not a random generator state"
        if name == "torch_rng" and not _valid_cpu_rng(state):
            return f"{where}{name} is not a random generator state"
    return None


def _data_state_problem(doc) -> str | None:
    if not isinstance(doc, dict) or doc.get("version") != 1:
        return "not version 1 of the format"
    feeds = doc.get("feeds")
    if not isinstance(feeds, dict) or not isinstance(feeds.get("test", []), list):
        return "no feeds"
    problem = _feed_problem(feeds.get("train"), "the train feed")
    for i, saved in enumerate(feeds.get("test", [])):
        problem = problem or _feed_problem(saved, f"test feed {i}")
    ranks = feeds.get("ranks")  # a distributed run's: each rank's train feed and generators
    if ranks is not None and not isinstance(ranks, list):
        return "'ranks' is not a list"
    for i, rank in enumerate(ranks or []):
        if not isinstance(rank, dict):
            return f"rank {i} is not a map"
        problem = problem or _feed_problem(rank.get("train"), f"rank {i}'s train feed")
        problem = problem or _rng_problem(rank, f"rank {i}'s ")
    return problem or _rng_problem(doc, "")


def _valid_cpu_rng(state: torch.Tensor) -> bool:
    saved = torch.get_rng_state()
    try:
        torch.set_rng_state(state)
    except RuntimeError:
        return False
    finally:
        torch.set_rng_state(saved)
    return True


def restore_rng(doc: dict, device: torch.device | None) -> None:
    """Set torch's generators from a read_data_state document (checked there)."""
    torch.set_rng_state(_rng_from_text(doc["torch_rng"]))
    if "cuda_rng" in doc and device is not None and device.type == "cuda":
        try:
            torch.cuda.set_rng_state(_rng_from_text(doc["cuda_rng"]), device)
        except RuntimeError as exc:
            raise CaffeAlexError(f"the saved CUDA generator state does not fit this device: "
                                 f"{describe(exc)}") from None  # fmt: skip
