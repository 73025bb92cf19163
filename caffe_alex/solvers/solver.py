"""Caffe's Solver: Solver::Step, Solve, Test, Snapshot and Restore over the nets of a solver file.

One iteration, as Caffe: clear the parameter diffs; test if due; forward/backward ``iter_size``
times, the gradients accumulating; smooth the loss over ``average_loss`` iterations for the
display (display.py); then the parameter update (update.py: Caffe's ApplyUpdate); iter += 1;
snapshot when due or asked. Log lines keep Caffe's wording so tools/extra/parse_log.py reads
our logs.
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np
import torch

from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..formats.prototxt import read_solver, resolve_snapshot_prefix
from ..formats.upgrade import upgrade_solver
from ..log import get_logger
from ..proto import caffe_pb2
from . import snapshot
from .debug import backward_info, forward_info
from .display import SmoothedLoss, log_outputs
from .feeds import TrackedFeed
from .lr_policy import check_policy
from .nets import build_test_nets, build_train_net, share_trained_layers
from .rules import RULES
from .update import ParameterUpdate

log = get_logger()
f32 = np.float32
SP = caffe_pb2.SolverParameter


def pick_device(param, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if param.solver_mode == SP.GPU:
        if torch.cuda.is_available() and param.device_id < torch.cuda.device_count():
            return torch.device("cuda", param.device_id)
        log.warning("solver_mode is GPU (the default) but CUDA device %d is not available; "
                    "using the CPU", param.device_id)  # fmt: skip
    return torch.device("cpu")


def check_param(param) -> None:
    if param.type not in RULES:
        raise CaffeAlexError(f"unknown solver type '{param.type}'; known: {', '.join(RULES)}")
    if param.regularization_type not in ("L1", "L2"):
        raise CaffeAlexError(
            f"unknown regularization_type '{param.regularization_type}' (L1 or L2)"
        )
    for name in ("average_loss", "iter_size"):
        if getattr(param, name) < 1:
            raise CaffeAlexError(f"{name} must be >= 1 (got {getattr(param, name)})")
    for name in ("display", "max_iter", "snapshot", "test_interval"):
        if getattr(param, name) < 0:
            raise CaffeAlexError(f"{name} must be >= 0 (got {getattr(param, name)})")
    if any(n <= 0 for n in param.test_iter):
        raise CaffeAlexError(f"test_iter must be > 0 (got {list(param.test_iter)})")
    check_policy(param)


class Solver:
    """Training from a SolverParameter, as Caffe's Solver does (``Solver.from_file(path)``).

    ``device``: where the nets run (default: the solver's solver_mode/device_id, falling back
    to the CPU); ``weights``: files to fine-tune from (after the solver's own ``weights``);
    ``feeds``: where batches come from (default: ``make_feed`` over each net's data layers;
    else a callable ``(net, test_index or None) -> iterable of input dicts``, or
    ``{"train": iterable, "test": [iterables]}``); ``seed`` overrides random_seed;
    ``feed_options`` go to ``make_feed``; ``insert_splits`` builds the nets with Caffe's
    implicit Split layers (the pycaffe layer's solvers do, for Caffe's layer and blob names).
    ``solve()`` runs to max_iter (``resume`` = a .solverstate to continue from), ``step(n)``
    runs n iterations, ``test(i)`` scores test net i, ``snapshot()`` / ``restore(path)`` write
    and read the state; ``request("stop" | "snapshot")`` is honoured between iterations;
    ``callbacks`` are called after each update with (iteration, smoothed loss, rate, images per
    second); ``start_hooks`` and ``gradient_hooks`` (no arguments) where Caffe calls its
    callbacks' on_start (before the forward passes) and on_gradients_ready (before the update).
    """

    def __init__(self, solver_param, *, source_path=None, device=None, weights=None,
                 feeds=None, seed=None, feed_options=None, insert_splits=False):  # fmt: skip
        param = self.param = SP()
        param.CopyFrom(solver_param)
        if param.HasField("solver_type"):
            param.CopyFrom(upgrade_solver(param, source_path))
        if seed is not None:
            param.random_seed = int(seed)
        self.source_path = os.fspath(source_path) if source_path else None
        if self.source_path and not param.HasField("snapshot_prefix"):
            resolve_snapshot_prefix(param, self.source_path)
        check_param(param)
        log.info("Initializing solver from parameters: \n%s", param)
        self._check_snapshot_prefix()
        if param.random_seed >= 0:
            torch.manual_seed(param.random_seed)  # fillers and dropout masks
        self.device = pick_device(param, device)
        self.train_net = build_train_net(param, self.source_path, self.device, insert_splits)
        self.test_nets = build_test_nets(param, self.source_path, self.device, insert_splits)
        for net in self.test_nets:
            share_trained_layers(net, self.train_net)
        self._load_initial_weights(list(param.weights) + list(weights or []))
        self.learnable = self.train_net.learnable_params()
        for info in self.learnable:  # Caffe computes no diff for a parameter with lr_mult 0
            if info.lr_mult == 0:
                info.param.requires_grad_(False)
        self.rule = RULES[param.type](self.learnable, param)
        self.update = ParameterUpdate(param, self.learnable, self.rule)
        self.iter = self.current_step = 0
        self.callbacks: list = []
        self.start_hooks: list = []
        self.gradient_hooks: list = []
        self._requested: str | None = None
        self._early_exit = False
        self._loss = SmoothedLoss(param.average_loss)
        self._feed_seed = (param.random_seed if param.random_seed >= 0
                           else secrets.randbits(62))  # fmt: skip
        self._feed_options = dict(feed_options or {})
        self._feeds = self._make_feeds(feeds)
        self._batch_size = None
        log.info("Solver scaffolding done.")

    @classmethod
    def from_file(cls, path, **kwargs) -> Solver:
        return cls(read_solver(path), source_path=path, **kwargs)

    # -- set-up ---------------------------------------------------------------------------
    def _check_snapshot_prefix(self) -> None:
        if not self.param.snapshot:
            return
        if not self.param.HasField("snapshot_prefix"):
            raise CaffeAlexError("snapshot is specified but snapshot_prefix is not")
        probe = self._filename(".tempfile", 0)
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError:
            raise CaffeAlexError(
                f"cannot write to snapshot prefix '{self.param.snapshot_prefix}'; make sure "
                "that the folder exists and is writable"
            ) from None

    def _load_initial_weights(self, lists) -> None:
        paths = [p.strip() for item in lists for p in item.split(",") if p.strip()]
        if not paths:
            return
        for path in paths:
            log.info("Finetuning from %s", path)
        self.train_net.load_weights(paths)
        train_layers = set(self.train_net.layer_names)
        for net in self.test_nets:  # layers only a test net has get the weights too
            if any(len(net.layer(n).blobs) and n not in train_layers for n in net.layer_names):
                net.load_weights(paths)

    def _make_feeds(self, feeds) -> dict:
        def maker(net, index):
            def make():
                if feeds is None:
                    return self._default_feed(net, index, None), True
                if callable(feeds):
                    return iter(feeds(net, index)), False
                given = feeds["train"] if index is None else feeds["test"][index]
                return iter(given), False

            return make

        made = {"train": TrackedFeed(maker(self.train_net, None), self.train_net, "train")}
        for i, net in enumerate(self.test_nets):
            made[i] = TrackedFeed(maker(net, i), net, f"test #{i}")
        return made

    def _default_feed(self, net, index, seed):
        if seed is None:
            seed = self._feed_seed + (0 if index is None else 1 + index)
        return make_feed(net, seed=seed, device=self.device, **self._feed_options)

    def _remaker(self, key):
        net = self.train_net if key == "train" else self.test_nets[key]
        index = None if key == "train" else key
        return lambda seed: self._default_feed(net, index, seed)

    def feed(self, which):
        """The feed of the train net ("train") or of test net ``which`` (an index): what the
        solver draws batches from, for code that runs the nets between iterations."""
        return self._feeds[which]

    # -- requests and callbacks -------------------------------------------------------------
    def request(self, action: str) -> None:
        """Ask for "stop" or "snapshot" at the next check (safe from a signal handler)."""
        if action not in ("stop", "snapshot", "none"):
            raise ValueError(f"unknown solver action {action!r}")
        self._requested = None if action == "none" else action

    def _take_request(self) -> str | None:
        action, self._requested = self._requested, None
        return action

    # -- training -------------------------------------------------------------------------
    def step(self, iters: int) -> None:
        start_iter, stop_iter = self.iter, self.iter + iters
        param = self.param
        self._loss = SmoothedLoss(param.average_loss, start_iter)
        timer, iterations_last = time.perf_counter(), self.iter
        while self.iter < stop_iter:
            began = time.perf_counter()
            for info in self.train_net.param_infos:  # ClearParamDiffs
                info.param.grad = None
            if self._test_due():
                self.test_all()
                if self._early_exit:
                    break
            for hook in self.start_hooks:
                hook()
            display = param.display and self.iter % param.display == 0
            loss = self._forward_backward(display and param.debug_info)
            self._loss.add_lazily(self.iter, loss)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse or 1)
                log.info("Iteration %d (%g iter/s, %gs/%d iters), loss = %g", self.iter,
                         f32(per_s), f32(lapse), param.display, self._loss.value)  # fmt: skip
                timer, iterations_last = time.perf_counter(), self.iter
                log_outputs(self.train_net, "Train")
            for hook in self.gradient_hooks:
                hook()
            rate = self.apply_update(display)
            if self.callbacks:
                self._notify(rate, time.perf_counter() - began)
            action = self._take_request()
            if (param.snapshot and self.iter % param.snapshot == 0) or action == "snapshot":
                self.snapshot()
            if action == "stop":
                self._early_exit = True
                break
        self._loss.flush()

    def _test_due(self) -> bool:
        interval = self.param.test_interval
        return (
            bool(interval)
            and self.iter % interval == 0
            and (self.iter > 0 or self.param.test_initialization)
        )

    def _forward_backward(self, debug: bool) -> torch.Tensor:
        net, total = self.train_net, None
        for _ in range(self.param.iter_size):
            batch = next(self._feeds["train"])
            if self._batch_size is None:
                self._batch_size = next((int(v.shape[0]) for v in batch.values()), 1)
            net(**batch)
            loss = net.loss
            if loss is None:
                loss = torch.zeros((), device=self.device)
            elif loss.requires_grad:
                loss.backward()
            if debug:
                forward_info(net)
                backward_info(net)
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        return total / self.param.iter_size

    def _notify(self, rate: float, seconds: float) -> None:
        loss = self._loss.value
        images = (self._batch_size or 1) * self.param.iter_size / max(seconds, 1e-9)
        for callback in self.callbacks:
            callback(self.iter, loss, rate, images)

    def apply_update(self, display: bool = False) -> float:
        """Caffe's ApplyUpdate (update.py), then iter += 1; returns the learning rate used."""
        rate, self.current_step = self.update.apply(self.iter, self.current_step, display)
        self.iter += 1
        return rate

    # -- testing --------------------------------------------------------------------------
    def test_all(self) -> None:
        for index in range(len(self.test_nets)):
            if self._early_exit:
                break
            self.test(index)

    def test(self, index: int = 0) -> dict:
        """Run test_iter[index] batches of test net ``index``; log and return mean outputs."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, index)
        net, iters = self.test_nets[index], self.param.test_iter[index]
        sums, loss = None, f32(0)
        with torch.no_grad():
            for _ in range(iters):
                if self._handle_requests_in_test():
                    log.info("Test interrupted.")
                    return {}
                outputs = net(**next(self._feeds[index]))
                if self.param.test_compute_loss and net.loss is not None:
                    loss += f32(net.loss.item())
                flat = torch.cat([outputs[n].detach().float().reshape(-1)
                                  for n in net.output_names]) if outputs else None  # fmt: skip
                sums = flat if sums is None else sums + flat
        if self.param.test_compute_loss:
            log.info("Test loss: %g", loss / f32(iters))
        means = (sums / iters).cpu().numpy() if sums is not None else np.zeros(0, np.float32)
        return log_outputs(net, "Test", means)

    def _handle_requests_in_test(self) -> bool:
        while (action := self._take_request()) is not None:
            if action == "snapshot":
                self.snapshot()
            elif action == "stop":
                self._early_exit = True
        return self._early_exit

    # -- solve ----------------------------------------------------------------------------
    def solve(self, resume: str | None = None) -> None:
        log.info("Solving %s", self.train_net.name)
        log.info("Learning Rate Policy: %s", self.param.lr_policy)
        self._early_exit = False
        if resume:
            log.info("Restoring previous solver status from %s", resume)
            self.restore(resume)
        self.step(self.param.max_iter - self.iter)
        param = self.param
        if param.snapshot_after_train and (not param.snapshot or self.iter % param.snapshot):
            self.snapshot()
        if self._early_exit:
            log.info("Optimization stopped early.")
            return
        if param.display and self.iter % param.display == 0:
            with torch.no_grad():
                self.train_net(**next(self._feeds["train"]))
            loss = self.train_net.loss
            value = f32(loss.item()) if loss is not None else f32(0)
            self._loss.add(value, self.iter)
            log.info("Iteration %d, loss = %g", self.iter, self._loss.value)
        if param.test_interval and self.iter % param.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- snapshots ------------------------------------------------------------------------
    def _filename(self, extension: str, iteration: int | None = None) -> str:
        iteration = self.iter if iteration is None else iteration
        return f"{self.param.snapshot_prefix}_iter_{iteration}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Write <prefix>_iter_N.caffemodel[.h5] and .solverstate[.h5] (and the data position)."""
        hdf5 = self.param.snapshot_format == SP.HDF5
        model = self._filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        log.info("Snapshotting to %s file %s", "HDF5" if hdf5 else "binary proto", model)
        self.train_net.save_weights(model, with_diffs=self.param.snapshot_diff)
        state_path = self._filename(".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting solver state to %s file %s", "HDF5" if hdf5 else "binary proto",
                 state_path)  # fmt: skip
        history = [h.detach().cpu().numpy() for h in self.rule.history]
        state = snapshot.SolverState(self.iter, self.current_step, model, history)
        (snapshot.write_hdf5 if hdf5 else snapshot.write_binary)(state_path, state)
        feeds = {"train": self._feeds["train"].state(),
                 "test": [self._feeds[i].state() for i in range(len(self.test_nets))]}  # fmt: skip
        snapshot.write_data_state(snapshot.data_state_path(state_path), feeds, self.device)
        return model, state_path

    def restore(self, path: str) -> None:
        """Resume from a .solverstate or .solverstate.h5: weights (learned_net), iteration,
        lr schedule position, history, and the data position and RNG state when saved."""
        state = snapshot.read_state(path)
        if state.learned_net:
            self.train_net.load_weights([self._learned_net(state.learned_net, path)])
        if len(state.history) != len(self.rule.history):
            raise CaffeAlexError(
                f"{path}: incorrect number of history blobs ({len(state.history)}; this "
                f"{self.param.type} solver keeps {len(self.rule.history)})"
            )
        for i, (array, target) in enumerate(zip(state.history, self.rule.history)):
            if array.size != target.numel():
                raise CaffeAlexError(
                    f"{path}: history blob {i} has shape {list(array.shape)}, expected "
                    f"{list(target.shape)}"
                )
            target.copy_(torch.from_numpy(array.reshape(tuple(target.shape))))
        log.info("SGDSolver: restoring history")
        self.iter, self.current_step = state.iter, state.current_step
        self._restore_data(path, state)

    @staticmethod
    def _learned_net(stored: str, state_path: str) -> str:
        # Caffe opens the path as stored (relative to the working directory); a snapshot moved
        # with its state file is found beside it instead
        if os.path.exists(stored):
            return stored
        beside = os.path.join(os.path.dirname(os.path.abspath(state_path)),
                              os.path.basename(stored))  # fmt: skip
        if os.path.exists(beside):
            return beside
        raise CaffeAlexError(f"{state_path}: its weights file {stored} does not exist")

    def _restore_data(self, path: str, state) -> None:
        doc = snapshot.read_data_state(snapshot.data_state_path(path))
        if doc is None:
            skip = state.iter * self.param.iter_size
            log.info("%s has no saved data position; the train data skips %d batches "
                     "(iter x iter_size)", path, skip)  # fmt: skip
            self._feeds["train"].skip_to(skip)
            return
        snapshot.restore_rng(doc, self.device)
        self._feeds["train"].load_state(doc["feeds"]["train"], self._remaker("train"))
        for i, saved in enumerate(doc["feeds"].get("test", [])[: len(self.test_nets)]):
            self._feeds[i].load_state(saved, self._remaker(i))

    def close(self) -> None:
        """Stop the feeds' worker processes."""
        for feed in self._feeds.values():
            feed.close()
