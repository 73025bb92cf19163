"""Caffe's Solver: Solver::Step, Solve, Test, Snapshot and Restore over the nets of a solver file.

One iteration, as Caffe: clear the parameter diffs; test if due; forward/backward ``iter_size``
times, the gradients accumulating; smooth the loss over ``average_loss`` iterations for the
display (display.py); then the parameter update (update.py: Caffe's ApplyUpdate); iter += 1;
snapshot when due or asked. Log lines keep Caffe's wording so tools/extra/parse_log.py reads
our logs.

The loop calls pieces, each in its own module: the display lines and their smoothed loss
(display.py's Progress), the test passes (scoring.py's SolverTests), the stop and snapshot requests
(requests.py), the nets (nets.py) and how they run (engines.py), the update (update.py), the rank
coordination (coordination.py: with a ``world``, distributed.py, the solver is one rank of several,
as in Caffe's multi-GPU training: seeds are random_seed + rank; only rank 0 builds the test nets,
tests, shows the display lines and writes snapshots; rank 0's parameters are broadcast at the
start; the train feed deals records round robin (make_feed's rank and world_size); the gradients
are summed over the ranks and scaled by 1/ranks before the update; requests are agreed every
iteration, so every rank stops or snapshots at the same iteration); the precision policy
(precision.py: ``precision`` "bf16" or "fp16" runs the forward passes under torch.autocast, fp16
with loss scaling); and snapshot and restore (checkpoint.py). ``channels_last`` and ``compile`` are
in nets.py; with ``compile``, a net of inner products, activations and losses has its whole
training step as one compiled function (captured.py).
"""

from __future__ import annotations

import os
import secrets
import time

import torch

from ..errors import CaffeAlexError
from ..formats.prototxt import read_solver, resolve_snapshot_prefix
from ..formats.upgrade import upgrade_solver
from ..log import get_logger
from ..proto import caffe_pb2
from . import checkpoint
from .captured import CAPTURED_TYPES, CapturedStep, captures
from .coordination import Ranked, coordination, join_world
from .debug import backward_info, forward_info
from .devices import choose_device
from .display import Progress
from .engines import make_engines
from .feeds import SolverFeeds, name_the_record
from .looped import looped_tests
from .lr_policy import check_policy, learning_rate
from .nets import apply_speed_options, build_solver_nets, seed_rank
from .precision import Precision
from .requests import Requests
from .rules import RULES
from .scoring import SolverTests
from .update import net_update

log = get_logger()
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


# long: Caffe's Solver in one class (Step, Solve, Test, Snapshot, Restore, the iteration), each
# piece's work done by its own module (display, scoring, requests, engines, update, captured)
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
    ``callbacks`` are called after each update (captured chunks in a row: after the row's
    last, up to 128 iterations; a stop they request is honoured there) with
    (iteration, smoothed loss, rate, images per second), and may read the train net's blobs
    unless they say they do not (an attribute ``reads_blobs = False``, as the CLI's progress
    bar: then the iterations between displays run only what the loss needs, and are captured
    with ``compile``); ``start_hooks`` and ``gradient_hooks`` (no arguments) where Caffe
    calls its callbacks' on_start (before the forward passes) and on_gradients_ready (before
    the update).
    ``world`` (distributed.World): this solver is one rank of several (see the module's notes;
    coordination.Waiting(rank, size): that rank, to ``join`` its world later);
    ``precision`` ("fp32", "bf16", "fp16"), ``channels_last`` and ``compile`` (True or a
    torch.compile backend) trade Caffe's exact float32 numbers for speed; ``compile`` captures
    a net's whole training step where its layers allow (captured.py), else compiles each net's
    forward.
    ``layerwise``: the nets run as Caffe runs them (engines.py's BlobEngine: persistent blobs,
    layer by layer, every blob's diff kept after each iteration), as pycaffe's solvers do;
    ``engines["train"]`` and ``engines[i]`` are how each net runs.
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
        captured = compile and captures(self, layerwise)  # captured.py: the whole step
        # a captured net's test nets stay eager: a forward of such layers gains less from a
        # compile than the compile costs (logreg's test net: 1.4 s, and again at a thread change)
        compiled = [] if captured else [self.train_net, *self.test_nets]
        apply_speed_options(compiled, channels_last, compile)
        nets = {"train": self.train_net, **dict(enumerate(self.test_nets))}
        self.engines = make_engines(nets, self.precision, self.device, self.feeds, layerwise)
        self._prepare_update()
        self._captured = CapturedStep(self.train_net, self.update, compile) if captured else None
        self.iter = self.current_step = 0
        self.callbacks: list = []
        self.start_hooks: list = []
        self.gradient_hooks: list = []
        self._requests = Requests()
        self._progress = Progress(param)
        self._tests = SolverTests(param, self.test_nets, self.feeds, self._forward,
                                  self._requests)  # fmt: skip
        if self._captured is not None:  # a small test net's passes as compiled loops too
            self._tests.looped = looped_tests(self.test_nets, self._captured.compile,
                                              CAPTURED_TYPES)  # fmt: skip
        log.info("Solver scaffolding done.")

    def _build(self, weights, insert_splits, feeds, feed_options) -> None:
        """The nets, weights and feeds: what a rank may fail at before the ranks first talk."""
        param = self.param
        if self.is_root:  # Caffe checks the snapshot folder on the first rank only
            checkpoint.check_prefix(param)
        seed_rank(param, self.rank, self.device)
        self.train_net, self.test_nets = build_solver_nets(
            param, self.source_path, self.device, insert_splits, self.is_root, weights
        )
        seed = param.random_seed if param.random_seed >= 0 else secrets.randbits(62)
        self.feeds = SolverFeeds(self.train_net, self.test_nets, feeds, seed,
                                 dict(feed_options or {}), self.ranks, self.device)  # fmt: skip
        if self.ranks.size > 1:
            self.feeds["train"].open()  # a missing train source stops every rank now

    def _prepare_update(self) -> None:
        """The learnable parameters, the update rule over them, and what the ranks and the
        precision policy need to know of them."""
        self.update = net_update(self.param, self.train_net)
        self.learnable, self.rule = self.update.learnable, self.update.rule
        params = [info.param for info in self.learnable]
        self.feeds.seed = self.ranks.start(
            params, self.feeds.seed, self.feeds["train"], self.param.layer_wise_reduce
        )
        self.precision.watch(params)

    @classmethod
    def from_file(cls, path, **kwargs) -> Solver:
        return cls(read_solver(path), source_path=path, **kwargs)

    def feed(self, which):
        """The feed of the train net ("train") or of test net ``which`` (an index): what the
        solver draws batches from, for code that runs the nets between iterations."""
        return self.feeds[which]

    def request(self, action: str) -> None:
        """Ask for "stop" or "snapshot" at the next check (safe from a signal handler)."""
        self._requests.ask(action)

    # -- training -------------------------------------------------------------------------
    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (fewer when asked to stop), as Caffe's Solver::Step."""
        stop_iter = self.iter + iters
        self._progress.restart(self.iter)
        with self.train_net.threads():  # a small net's backward and update on one thread too
            while self.iter < stop_iter and self._iteration(stop_iter - self.iter):
                pass
        self._progress.loss.flush()

    def _iteration(self, left: int = 1) -> bool:
        """One pass of Step's loop (several where the captured step runs them as one call);
        False when training stops here. ``left``: iterations left in this ``step``, the last
        of which Python may read the blobs of (engines.py's ``skip_blobs``)."""
        began, first = time.perf_counter(), self.iter
        self._clear_diffs()
        if self._tests.due(self.iter) and not self._test_and_agree():
            return False
        for hook in self.start_hooks:
            hook()
        display = self._progress.due(self.iter) and self.is_root
        watched = bool(left == 1 or self.start_hooks or self.gradient_hooks
                       or any(getattr(c, "reads_blobs", True) for c in self.callbacks))
        rate, drawn = None, []
        if self._captured is not None and not (watched or display):
            rate, drawn = self._captured.run(self, left)
            self._captured = None if rate is None else self._captured  # None: failed to compile
        if rate is None:  # eagerly: the feed's next batch, or those a failed capture drew
            rate = self._eager_step(display, watched, drawn[0] if drawn else None)
            for batch in drawn[1:]:  # (one iteration each; none of them is watched)
                self._clear_diffs()  # (each its own gradients, not the last one's added)
                rate = self._eager_step(False, False, batch)
        if self.callbacks:  # (once for the iterations of a captured chunk: the last one's)
            seconds = (time.perf_counter() - began) / max(self.iter - first, 1)
            self._progress.notify(self.callbacks, self.iter, rate, seconds, self.ranks.size)
        snap, stop = self._requests.after_iteration(self.ranks)
        if (self.param.snapshot and self.iter % self.param.snapshot == 0) or snap:
            self.snapshot()
        self._requests.early_exit = self._requests.early_exit or stop
        return not stop

    def _clear_diffs(self) -> None:
        """Caffe's ClearParamDiffs: the next backward starts from no gradient."""
        for info in self.train_net.param_infos:
            info.param.grad = None

    def _eager_step(self, display: bool, watched: bool, batch=None) -> float:
        """Forward, backward and update of one iteration, eagerly (on ``batch`` when given,
        else the feed's next); returns the rate."""
        loss = self._forward_backward(display and self.param.debug_info, watched, batch,
                                      shown=display)  # fmt: skip
        self._progress.loss.add_lazily(self.iter, loss)
        if display:
            self._progress.show(self.iter, self.train_net, self.engines["train"].blob)
        for hook in self.gradient_hooks:
            hook()
        self.ranks.finish_gradients()
        return self.apply_update(display)

    def _test_and_agree(self) -> bool:
        """The test pass (rank 0), then what the ranks asked meanwhile; False: stop."""
        if self.is_root:
            self.test_all()
        if self.ranks.size > 1:
            self._requests.after_test(self.ranks, self.snapshot)
        return not self._requests.early_exit

    def _forward_backward(self, debug: bool, keep_blobs: bool = True, first=None,
                          shown: bool = True):  # fmt: skip
        # (``first``: the first pass's batch, already drawn; ``shown``: the display reads the
        # last pass's outputs)
        engine, total, passes = self.engines["train"], None, self.param.iter_size
        for index in range(passes):
            batch = first if index == 0 and first is not None else next(self.feeds["train"])
            self._progress.see_batch(batch)
            self.ranks.arm(index == passes - 1)  # the last pass's gradients are final
            last_pass = keep_blobs and index == passes - 1  # only its blobs stay to be read
            # (a pass whose outputs no one reads runs only what its loss needs)
            read = last_pass or debug or (shown and index == passes - 1)
            _, loss = self._forward("train", batch, keep_blobs=last_pass, loss_only=not read)
            engine.backward(loss)
            if loss is None:
                loss = torch.zeros((), device=self.device)
            if debug:
                forward_info(self.train_net, engine.blob)
                backward_info(self.train_net)
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        return total if passes == 1 else total / passes

    def _forward(self, key, batch: dict, grad: bool = True, keep_blobs: bool = True,
                 loss_only: bool = False):  # fmt: skip
        """Run net ``key`` ("train" or a test net's index) on ``batch``: (outputs, loss). An
        error about one item of the batch (a bad label) also names the record it came from,
        which only the feed knows. ``keep_blobs`` False: Python cannot read this pass's blobs
        (engines.py's ``skip_blobs``); ``loss_only``: nor its outputs (Net.loss_only)."""
        engine = self.engines[key]
        engine.skip_blobs, engine.loss_only = not keep_blobs, loss_only
        try:
            return engine.forward(batch, grad)
        except CaffeAlexError as exc:
            name_the_record(exc, self.feeds[key])
            raise

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
            if self._requests.early_exit:
                break
            self.test(index)

    def test(self, index: int = 0) -> dict:
        """Run test_iter[index] batches of test net ``index``; log and return mean outputs."""
        return self._tests.run(index, self.iter, self.ranks, self.snapshot)

    # -- solve ----------------------------------------------------------------------------
    def solve(self, resume: str | None = None) -> None:
        log.info("Solving %s", self.train_net.name)
        log.info("Learning Rate Policy: %s", self.param.lr_policy)
        self._requests.early_exit = False
        if resume:
            log.info("Restoring previous solver status from %s", resume)
            self.restore(resume)
        self.step(self.param.max_iter - self.iter)
        param = self.param
        if param.snapshot_after_train and (not param.snapshot or self.iter % param.snapshot):
            self.snapshot()
        if self._requests.early_exit:
            log.info("Optimization stopped early.")
            return
        if not self.is_root:  # Caffe's final display and test run on the first rank only
            return
        if self._progress.due(self.iter):
            with torch.no_grad():
                _, loss = self._forward("train", next(self.feeds["train"]), grad=False)
            self._progress.show_last(self.iter, loss)
        if param.test_interval and self.iter % param.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- snapshots and ranks --------------------------------------------------------------
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
        checkpoint.restore(self, path)

    def join(self, world) -> None:
        """Become rank ``world.rank`` of ``world`` after being built as that rank of that many
        (``world=coordination.Waiting(rank, size)``), as pycaffe's NCCL joins the solvers its
        processes built: the ranks agree on the feed seed and the gradients are summed over
        them from the next iteration on; rank 0's parameters come with ``world``'s
        broadcast_tensors (NCCL.bcast)."""
        join_world(self, world)

    def close(self) -> None:
        """Stop the feeds' worker processes (and remove the gradient hooks of a world)."""
        self.feeds.close()
        self.ranks.close()
