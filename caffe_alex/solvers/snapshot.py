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
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CaffeAlexError
from ..formats.files import atomic_path
from ..formats.hdf5 import is_hdf5
from ..formats.wire import (
    WireError,
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
    return value - (1 << 64) if value >= 1 << 63 else value


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
                state.learned_net = bytes(buf[s:e]).decode()
            elif number == 3 and wire == 2:
                blob = parse_blob(buf, s, e)
                state.history.append(np.array(blob.data, np.float32).reshape(blob.shape))
            else:
                raise WireError(f"unexpected field {number}", s)
    except (WireError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", str(exc))
        raise CaffeAlexError(f"{path}: not a solver state (SolverState): {reason}") from None
    return state


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
    try:
        with h5py.File(path, "r") as f:
            state = SolverState(int(np.ravel(f["iter"][()])[0]),
                                int(np.ravel(f["current_step"][()])[0]))  # fmt: skip
            if "learned_net" in f:
                raw = f["learned_net"][()]
                raw = raw.tobytes() if isinstance(raw, np.ndarray) else raw
                state.learned_net = (raw.decode() if isinstance(raw, bytes) else raw).rstrip("\0")
            history = f["history"]
            state.history = [np.asarray(history[str(i)][()], np.float32)
                             for i in range(len(history))]  # fmt: skip
    except (OSError, KeyError) as exc:
        raise CaffeAlexError(f"{path}: not a solver state (HDF5): {exc}") from None
    return state


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
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), np.uint8).copy())


def write_data_state(path, feeds: dict, device: torch.device | None) -> None:
    """feeds: {"train": state or None, "test": [state or None, ...]}."""
    doc = {"version": 1, "feeds": feeds, "torch_rng": _rng_to_text(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        doc["cuda_rng"] = _rng_to_text(torch.cuda.get_rng_state(device))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f)


def read_data_state(path) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise CaffeAlexError(f"{path}: cannot read the saved data position: {exc}") from None
    return doc


def restore_rng(doc: dict, device: torch.device | None) -> None:
    torch.set_rng_state(_rng_from_text(doc["torch_rng"]))
    if "cuda_rng" in doc and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_rng_from_text(doc["cuda_rng"]), device)
