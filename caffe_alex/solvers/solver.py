"""Caffe's Solver: Solver::Step, Solve, Test, Snapshot and Restore over the nets of a solver file.

One iteration, as Caffe: clear the parameter diffs; test if due; forward/backward ``iter_size``
times, the gradients accumulating; smooth the loss over ``average_loss`` iterations for the
display (display.py); then the parameter update (update.py: Caffe's ApplyUpdate); iter += 1;
snapshot when due or asked. Log lines keep Caffe's wording so tools/extra/parse_log.py reads
our logs.

The loop calls three pieces, each in its own module: the rank coordination (coordination.py:
with a ``world``, distributed.py, the solver is one rank of several, as in Caffe's multi-GPU
training: seeds are random_seed + rank; only rank 0 builds the test nets, tests, shows the display
lines and writes snapshots; rank 0's parameters are broadcast at the start; the train feed deals
records round robin (make_feed's rank and world_size); the gradients are summed over the ranks
and scaled by 1/ranks before the update; requests are agreed every iteration, so every rank stops
or snapshots at the same iteration); the precision policy (precision.py: ``precision`` "bf16" or
"fp16" runs the forward passes under torch.autocast, fp16 with loss scaling); and snapshot and
restore (checkpoint.py). ``channels_last`` and ``compile`` are in nets.py.
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np
import torch

from ..errors import CaffeAlexError
from ..formats.prototxt import read_solver, resolve_snapshot_prefix
from ..formats.upgrade import upgrade_solver
from ..log import get_logger
from ..proto import caffe_pb2
from . import checkpoint
from .coordination import Ranked, coordination
from .debug import backward_info, forward_info
from .devices import choose_device
from .display import SmoothedLoss, log_outputs
from .engines import BlobEngine, GraphEngine
from .feeds import SolverFeeds, name_the_record
from .lr_policy import check_policy, learning_rate
from .nets import (
    apply_speed_options,
    build_test_nets,
    build_train_net,
    load_initial_weights,
    share_trained_layers,
)
from .precision import Precision
from .rules import RULES
from .scoring import score
from .update import ParameterUpdate

log = get_logger()
f32 = np.float32
SP = caffe_pb2.SolverParameter


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


def prepared_param(solver_param, source_path, seed) -> caffe_pb2.SolverParameter:
    """A copy of the solver definition as Caffe runs it: upgraded from the old solver_type,
    ``seed`` (when given) as its random_seed, its snapshot prefix resolved against the file."""
    param = SP()
    param.CopyFrom(solver_param)
    if param.HasField("solver_type"):
        param.CopyFrom(upgrade_solver(param, source_path))
    if seed is not None:
        param.random_seed = int(seed)
    if source_path and not param.HasField("snapshot_prefix"):
        resolve_snapshot_prefix(param, os.fspath(source_path))
    check_param(param)
    return param


class Solver:
    """Training from a SolverParameter, as Caffe's Solver does (``Solver.from_file(path)``).

    ``device``: where the nets run (default: the solver file's solver_mode/device_id when it
    sets solver_mode, else the CPU: devices.py); ``weights``: files to fine-tune from (after
    the solver's own ``weights``);
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
    ``world`` (distributed.World): this solver is one rank of several (see the module's notes;
    coordination.Waiting(rank, size): that rank, to ``join`` its world later);
    ``precision`` ("fp32", "bf16", "fp16"), ``channels_last`` and ``compile`` (True or a
    torch.compile backend name) trade Caffe's exact float32 numbers for speed.
    ``layerwise``: the nets run as Caffe runs them (engines.py's BlobEngine: persistent blobs,
    layer by layer, every blob's diff kept after each iteration), as pycaffe's solvers do;
    ``engines["train"]`` and ``engines[i]`` are how each net runs.

    (About 360 lines, past the 250 the code aims at: these are Caffe's Solver methods, Step,
    Solve, Test, Snapshot and Restore, which share the iteration counters, the requests and
    the feeds; each piece with a state of its own is an object they call: ranks
    (coordination.py), precision (precision.py), feeds (feeds.py), the update (update.py).)
    """

    def __init__(self, solver_param, *, source_path=None, device=None, weights=None,
                 feeds=None, seed=None, feed_options=None, insert_splits=False, world=None,
                 precision=None, channels_last=False, compile=False,
                 layerwise=False):  # fmt: skip
        param = self.param = prepared_param(solver_param, source_path, seed)
        self.source_path = os.fspath(source_path) if source_path else None
        self.ranks = coordination(world)
        self.world = self.ranks.world if isinstance(self.ranks, Ranked) else None
        self.rank, self.is_root = self.ranks.rank, self.ranks.is_root
        log.info("Initializing solver from parameters: \n%s", param)
        self.device = choose_device(device, param)  # the given device, else the file's
        self.precision = Precision(precision, channels_last, self.device)
        with self.ranks.together():
            self._build(weights, insert_splits, feeds, feed_options)
        apply_speed_options([self.train_net, *self.test_nets], channels_last, compile)
        self.engines = self._engines(layerwise)
        self._prepare_update()
        self.iter = self.current_step = 0
        self.callbacks: list = []
        self.start_hooks: list = []
        self.gradient_hooks: list = []
        self._requested: str | None = None
        self._early_exit = False
        self._deferred_snapshot = False
        self._loss = SmoothedLoss(param.average_loss)
        self._batch_size = None
        self._display_clock = (time.perf_counter(), 0)  # (when, iteration) of the last display
        log.info("Solver scaffolding done.")

    def _engines(self, layerwise: bool) -> dict:
        """How each net runs (engines.py): as one autograd graph, or Caffe's way."""
        nets = {"train": self.train_net, **dict(enumerate(self.test_nets))}
        if not layerwise:
            return {key: GraphEngine(net, self.precision) for key, net in nets.items()}
        if self.precision.autocast is not None or self.precision.channels_last:
            raise CaffeAlexError("precision and channels_last need the nets run as one graph "
                                 "(not layerwise)")  # fmt: skip
        feeds = self.feeds
        return {key: BlobEngine(net, self.device, source=lambda key=key: next(feeds[key]))
                for key, net in nets.items()}  # fmt: skip

    def _prepare_update(self) -> None:
        """The learnable parameters, the update rule over them, and what the ranks and the
        precision policy need to know of them."""
        self.learnable = self.train_net.learnable_params()
        for info in self.learnable:  # Caffe computes no diff for a parameter with lr_mult 0
            if info.lr_mult == 0:
                info.param.requires_grad_(False)
        self.rule = RULES[self.param.type](self.learnable, self.param)
        self.update = ParameterUpdate(self.param, self.learnable, self.rule)
        params = [info.param for info in self.learnable]
        self.feeds.seed = self.ranks.start(
            params, self.feeds.seed, self.feeds["train"], self.param.layer_wise_reduce
        )
        self.precision.watch(params)

    def _build(self, weights, insert_splits, feeds, feed_options) -> None:
        """The nets, weights and feeds: what a rank may fail at before the ranks first talk."""
        param = self.param
        if self.is_root:  # Caffe checks the snapshot folder on the first rank only
            checkpoint.check_prefix(param)
        if param.random_seed >= 0:
            # fillers and dropout masks; Caffe seeds each rank apart (random_seed + rank)
            torch.manual_seed(param.random_seed + self.rank)
            if self.device.type == "cuda":  # a seeded run repeats: cuDNN's fixed algorithms
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False
        self.train_net = build_train_net(param, self.source_path, self.device, insert_splits)
        # Only rank 0 tests (as Caffe), so the other ranks need neither test nets nor test data
        self.test_nets = (build_test_nets(param, self.source_path, self.device, insert_splits)
                          if self.is_root else [])  # fmt: skip
        for net in self.test_nets:
            share_trained_layers(net, self.train_net)
        if self.is_root:  # the other ranks receive rank 0's weights
            load_initial_weights(self.train_net, self.test_nets,
                                 list(param.weights) + list(weights or []))  # fmt: skip
        seed = param.random_seed if param.random_seed >= 0 else secrets.randbits(62)
        self.feeds = SolverFeeds(self.train_net, self.test_nets, feeds, seed,
                                 dict(feed_options or {}), self.ranks, self.device)  # fmt: skip
        if self.ranks.size > 1:
            self.feeds["train"].open()  # a missing train source stops every rank now

    @classmethod
    def from_file(cls, path, **kwargs) -> Solver:
        return cls(read_solver(path), source_path=path, **kwargs)

    # -- feeds ----------------------------------------------------------------------------
    def feed(self, which):
        """The feed of the train net ("train") or of test net ``which`` (an index): what the
        solver draws batches from, for code that runs the nets between iterations."""
        return self.feeds[which]

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
        """Run ``iters`` iterations (fewer when asked to stop), as Caffe's Solver::Step."""
        stop_iter = self.iter + iters
        self._loss = SmoothedLoss(self.param.average_loss, self.iter)
        self._display_clock = (time.perf_counter(), self.iter)
        with self.train_net.threads():  # a small net's backward and update on one thread too
            while self.iter < stop_iter and self._iteration():
                pass
        self._loss.flush()

    def _iteration(self) -> bool:
        """One pass of Step's loop; False when training stops here."""
        began = time.perf_counter()
        for info in self.train_net.param_infos:  # ClearParamDiffs
            info.param.grad = None
        if self._test_due() and not self._test_and_agree():
            return False
        for hook in self.start_hooks:
            hook()
        display = bool(self.param.display) and self.iter % self.param.display == 0
        display = display and self.is_root
        loss = self._forward_backward(display and self.param.debug_info)
        self._loss.add_lazily(self.iter, loss)
        if display:
            self._display()
        for hook in self.gradient_hooks:
            hook()
        self.ranks.finish_gradients()
        rate = self.apply_update(display)
        if self.callbacks:
            self._notify(rate, time.perf_counter() - began)
        snap, stop = self._requests()
        if (self.param.snapshot and self.iter % self.param.snapshot == 0) or snap:
            self.snapshot()
        self._early_exit = self._early_exit or stop
        return not stop

    def _display(self) -> None:
        """Caffe's display lines: speed and smoothed loss, then the train net's outputs."""
        since, first = self._display_clock
        lapse = time.perf_counter() - since
        per_s = (self.iter - first) / (lapse or 1)
        log.info("Iteration %d (%g iter/s, %gs/%d iters), loss = %g", self.iter, f32(per_s),
                 f32(lapse), self.param.display, self._loss.value)  # fmt: skip
        self._display_clock = (time.perf_counter(), self.iter)
        log_outputs(self.train_net, "Train", blobs=self.engines["train"].blob)

    def _test_and_agree(self) -> bool:
        """The test pass (rank 0), then what the ranks asked meanwhile; False: stop."""
        if self.is_root:
            self.test_all()
        if self.ranks.size > 1:
            self._agree_after_test()
        return not self._early_exit

    def _requests(self) -> tuple[bool, bool]:
        """(snapshot, stop) asked for by a signal, on this rank or (with a world) on any."""
        action = self._take_request()
        return self.ranks.agree(action == "snapshot", action == "stop")

    def _agree_after_test(self) -> None:
        """Rank 0 has tested while the others waited here: share what was asked meanwhile (a
        snapshot asked during the test is taken now, when every rank can join it)."""
        action = self._take_request()
        snap = action == "snapshot" or self._deferred_snapshot
        snap, stop = self.ranks.agree(snap, action == "stop" or self._early_exit)
        self._deferred_snapshot = False
        if snap:
            self.snapshot()
        self._early_exit = stop

    def _test_due(self) -> bool:
        interval = self.param.test_interval
        return (
            bool(interval)
            and self.iter % interval == 0
            and (self.iter > 0 or self.param.test_initialization)
        )

    def _forward_backward(self, debug: bool) -> torch.Tensor:
        engine, total, passes = self.engines["train"], None, self.param.iter_size
        for index in range(passes):
            batch = next(self.feeds["train"])
            if self._batch_size is None:
                self._batch_size = next((int(v.shape[0]) for v in batch.values()), 1)
            self.ranks.arm(index == passes - 1)  # the last pass's gradients are final
            _, loss = self._forward("train", batch)
            engine.backward(loss)
            if loss is None:
                loss = torch.zeros((), device=self.device)
            if debug:
                forward_info(self.train_net, engine.blob)
                backward_info(self.train_net)
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        return total if passes == 1 else total / passes

    def _forward(self, key, batch: dict, grad: bool = True):
        """Run net ``key`` ("train" or a test net's index) on ``batch``: (outputs, loss). An
        error about one item of the batch (a bad label) also names the record it came from,
        which only the feed knows."""
        try:
            return self.engines[key].forward(batch, grad)
        except CaffeAlexError as exc:
            name_the_record(exc, self.feeds[key])
            raise

    def _notify(self, rate: float, seconds: float) -> None:
        loss = self._loss.value
        ranks = self.ranks.size
        images = (self._batch_size or 1) * self.param.iter_size * ranks / max(seconds, 1e-9)
        for callback in self.callbacks:
            callback(self.iter, loss, rate, images)

    def apply_update(self, display: bool = False) -> float:
        """Caffe's ApplyUpdate (update.py), then iter += 1; returns the learning rate used."""
        done = self.precision.update(
            lambda: self.update.apply(self.iter, self.current_step, display)
        )
        if done is None:  # fp16 gradients overflowed: no update, the schedule moves on
            done = learning_rate(self.param, self.iter, self.current_step)
            log.warning("Iteration %d: fp16 gradients overflowed; update skipped, loss scale "
                        "now %g", self.iter, self.precision.scaler.get_scale())  # fmt: skip
        rate, self.current_step = done
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
        with_loss = self.param.test_compute_loss

        def forward(batch):
            outputs, loss = self._forward(index, batch, grad=False)
            return outputs, loss if with_loss else None

        scores = score(forward, self.feeds[index], iters, net.output_names,
                       stop=self._handle_requests_in_test)  # fmt: skip
        if scores is None:
            log.info("Test interrupted.")
            return {}
        if with_loss:
            log.info("Test loss: %g", scores.loss / f32(iters))
        return log_outputs(net, "Test", scores.means)

    def _handle_requests_in_test(self) -> bool:
        while (action := self._take_request()) is not None:
            if action == "snapshot" and self.ranks.size > 1:
                self._deferred_snapshot = True  # the other ranks join it after the test
            elif action == "snapshot":
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
        if not self.is_root:  # Caffe's final display and test run on the first rank only
            return
        if param.display and self.iter % param.display == 0:
            with torch.no_grad():
                _, loss = self._forward("train", next(self.feeds["train"]), grad=False)
            value = f32(loss.item()) if loss is not None else f32(0)
            self._loss.add(value, self.iter)
            log.info("Iteration %d, loss = %g", self.iter, self._loss.value)
        if param.test_interval and self.iter % param.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str] | None:
        """Write <prefix>_iter_N.caffemodel[.h5] and .solverstate[.h5] (and the data position).
        With a world every rank calls it: rank 0 gathers each rank's train-feed position and
        random state into the data file and writes; the other ranks return None."""
        ranks = self.ranks.gather(lambda: checkpoint.rank_state(self))
        if not self.is_root:
            return None
        return checkpoint.write(self, ranks)

    def restore(self, path: str) -> None:
        """Resume from a .solverstate or .solverstate.h5: weights (learned_net), iteration,
        lr schedule position, history, and the data position and RNG state when saved.
        With a world, rank 0 reads the files and sends the state to the other ranks (which
        need not see them), each of which takes its own train-feed position and RNG state."""
        counters = doc = None
        with self.ranks.together():
            if self.is_root or self.ranks.reads_alone:
                counters, doc = checkpoint.read(self, path)
        tensors = [info.param for info in self.learnable] + list(self.rule.history)
        counters, doc = self.ranks.share(tensors, (counters, doc))
        log.info("SGDSolver: restoring history")
        self.iter, self.current_step = counters
        with self.ranks.together():  # a rank whose feed cannot resume stops them all
            checkpoint.restore_data(self, path, doc)

    def join(self, world) -> None:
        """Become rank ``world.rank`` of ``world`` after being built as that rank of that many
        (``world=coordination.Waiting(rank, size)``), as pycaffe's NCCL joins the solvers its
        processes built: the ranks agree on the feed seed and the gradients are summed over
        them from the next iteration on; rank 0's parameters come with ``world``'s
        broadcast_tensors (NCCL.bcast)."""
        if (world.rank, world.size) != (self.rank, self.ranks.size):
            raise CaffeAlexError(
                f"this solver was built as rank {self.rank} of {self.ranks.size}; it cannot "
                f"join as rank {world.rank} of {world.size}"
            )
        self.world, self.ranks = world, Ranked(world)
        self.feeds.ranks = self.ranks
        params = [info.param for info in self.learnable]
        train, layer_wise = self.feeds["train"], self.param.layer_wise_reduce
        self.feeds.seed = self.ranks.start(params, self.feeds.seed, train, layer_wise, False)

    def close(self) -> None:
        """Stop the feeds' worker processes (and remove the gradient hooks of a world)."""
        self.feeds.close()
        self.ranks.close()
