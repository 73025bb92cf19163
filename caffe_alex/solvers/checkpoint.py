"""A solver's snapshot and restore (Caffe's Solver::Snapshot and Restore) over the state files
of snapshot.py: the weights, the update's history and counters, and what Caffe does not keep,
each feed's position and the random state, so that a resumed run goes on as the uninterrupted
one would. With several ranks, rank 0 writes what every rank sent it and reads the files
(coordination.py moves the states between the ranks)."""

from __future__ import annotations

import os

import torch

from ..errors import CaffeAlexError
from ..formats.atomic import temporary_path
from ..log import get_logger
from ..proto import caffe_pb2
from . import distributed, snapshot

log = get_logger()
SP = caffe_pb2.SolverParameter


def filename(param, iteration: int, extension: str) -> str:
    return f"{param.snapshot_prefix}_iter_{iteration}{extension}"


def check_prefix(param) -> None:
    """Caffe's check at start-up that snapshots can be written where snapshot_prefix says."""
    if not param.snapshot:
        return
    if not param.HasField("snapshot_prefix"):
        raise CaffeAlexError("snapshot is specified but snapshot_prefix is not")
    # a temporary named as our writers name theirs, so a killed run's probe is cleaned up
    probe = temporary_path(filename(param, 0, ".tempfile"))
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError:
        raise CaffeAlexError(
            f"cannot write to snapshot prefix '{param.snapshot_prefix}'; make sure "
            "that the folder exists and is writable"
        ) from None


def rank_state(solver) -> dict:
    """What a rank sends rank 0 for a snapshot: its train feed's position and random state."""
    return {"train": solver.feed("train").state(), **distributed.rng_state(solver.device)}


def write(solver, ranks: list | None) -> tuple[str, str]:
    """<prefix>_iter_N.caffemodel[.h5], .solverstate[.h5] and the data position beside it;
    ``ranks``: each rank's rank_state, when there are several."""
    param = solver.param
    hdf5 = param.snapshot_format == SP.HDF5
    model = filename(param, solver.iter, ".caffemodel.h5" if hdf5 else ".caffemodel")
    log.info("Snapshotting to %s file %s", "HDF5" if hdf5 else "binary proto", model)
    solver.train_net.save_weights(model, with_diffs=param.snapshot_diff)
    state_path = filename(param, solver.iter, ".solverstate.h5" if hdf5 else ".solverstate")
    log.info("Snapshotting solver state to %s file %s", "HDF5" if hdf5 else "binary proto",
             state_path)  # fmt: skip
    history = [h.detach().cpu().numpy() for h in solver.rule.history]
    state = snapshot.SolverState(solver.iter, solver.current_step, model, history)
    (snapshot.write_hdf5 if hdf5 else snapshot.write_binary)(state_path, state)
    feeds = {"train": solver.feed("train").state(),
             "test": [solver.feed(i).state() for i in range(len(solver.test_nets))]}  # fmt: skip
    if ranks is not None:
        feeds["ranks"] = ranks  # by rank: {"train": feed state, "torch_rng": ...}
    snapshot.write_data_state(snapshot.data_state_path(state_path), feeds, solver.device)
    return model, state_path


def restore(solver, path: str) -> None:
    """Solver.restore: rank 0 (or a process alone) reads the files, the ranks get its state,
    each takes its own train-feed position and random state."""
    counters = doc = None
    with solver.ranks.together():
        if solver.is_root or solver.ranks.reads_alone:
            counters, doc = read(solver, path)
    tensors = [info.param for info in solver.learnable] + list(solver.rule.history)
    counters, doc = solver.ranks.share(tensors, (counters, doc))
    log.info("SGDSolver: restoring history")
    solver.iter, solver.current_step = counters
    with solver.ranks.together():  # a rank whose feed cannot resume stops them all
        restore_data(solver, path, doc)


def read(solver, path: str) -> tuple[tuple[int, int], dict | None]:
    """Load a .solverstate[.h5]'s weights and history into ``solver``; returns its counters
    (iter, current_step) and the saved data position (None without one)."""
    state = snapshot.read_state(path)
    if state.learned_net:
        solver.train_net.load_weights([learned_net_path(state.learned_net, path)])
    history = solver.rule.history
    if len(state.history) != len(history):
        raise CaffeAlexError(
            f"{path}: incorrect number of history blobs ({len(state.history)}; this "
            f"{solver.param.type} solver keeps {len(history)})"
        )
    for i, (array, target) in enumerate(zip(state.history, history)):
        if array.size != target.numel():
            raise CaffeAlexError(
                f"{path}: history blob {i} has shape {list(array.shape)}, expected "
                f"{list(target.shape)}"
            )
        target.copy_(torch.from_numpy(array.reshape(tuple(target.shape))))
    doc = snapshot.read_data_state(snapshot.data_state_path(path))
    return (state.iter, state.current_step), doc


def learned_net_path(stored: str, state_path: str) -> str:
    # Caffe opens the path as stored (relative to the working directory); a snapshot moved
    # with its state file is found beside it instead
    if os.path.exists(stored):
        return stored
    beside = os.path.join(os.path.dirname(os.path.abspath(state_path)),
                          os.path.basename(stored))  # fmt: skip
    if os.path.exists(beside):
        return beside
    raise CaffeAlexError(f"{state_path}: its weights file {stored} does not exist")


def restore_data(solver, path: str, doc: dict | None) -> None:
    """Put the feeds (and the random state) where the snapshot left them; without a saved
    position, or from a run of another rank count, skip iter x iter_size train batches."""
    skip = solver.iter * solver.param.iter_size
    train = solver.feed("train")
    if doc is None:
        log.info("%s has no saved data position; the train data skips %d batches "
                 "(iter x iter_size)", path, skip)  # fmt: skip
        train.skip_to(skip)
        return
    saved = doc["feeds"]
    ranks = saved.get("ranks")
    size = solver.ranks.size
    if (len(ranks) if ranks else 1) != size:
        log.warning("%s was written by %d rank(s) and this run has %d: each rank's train data "
                    "skips %d batches (iter x iter_size) instead", path,
                    len(ranks) if ranks else 1, size, skip)  # fmt: skip
        train.skip_to(skip)
    else:
        snapshot.restore_rng(doc, solver.device)
        mine = ranks[solver.rank] if ranks else {"train": saved["train"]}
        if ranks:
            distributed.set_rng_state(mine, solver.device)
        train.load_state(mine["train"], solver.feeds.remaker("train"))
    for i, saved in enumerate(doc["feeds"].get("test", [])[: len(solver.test_nets)]):
        solver.feed(i).load_state(saved, solver.feeds.remaker(i))
