"""``caffe-alex train`` and ``caffe-alex test``: Caffe's ``caffe train`` / ``caffe test`` flags,
log lines and signal effects, over caffe_alex.solvers.Solver and caffe_alex.net.Net."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import click
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.loader import make_feed
from ..formats.prototxt import read_solver
from ..log import GlogFormatter, get_logger
from ..net import Net
from ..solvers import Solver
from ..tools.plot_log import parse_log, plot
from ..tools.plot_log import write_csv as write_table
from .options import option, resolve_device, user_errors

_EFFECTS = click.Choice(["stop", "snapshot", "none"])


def _split(value: str) -> list[str]:
    return [s for s in (value or "").split(",") if s]


def gpu_from_solver(gpu: str | None, solver_param) -> str | None:
    """Without --gpu, the solver file's solver_mode/device_id choose (as caffe.cpp does)."""
    if gpu:
        return gpu
    if solver_param.HasField("solver_mode") and solver_param.solver_mode == solver_param.GPU:
        return str(solver_param.device_id) if solver_param.HasField("device_id") else "0"
    return None


def _device_for(gpu: str | None):
    """The torch device for a --gpu value, logged the way caffe.cpp logs its choice."""
    log = get_logger()
    device = resolve_device(gpu)
    if device.type == "cpu":
        log.info("Use CPU.")
        return device
    ids = list(range(torch.cuda.device_count())) if gpu == "all" else [int(g) for g in _split(gpu)]
    log.info("Using GPUs %s", ", ".join(map(str, ids)))
    log.info("GPU %d: %s", device.index, torch.cuda.get_device_name(device))
    if len(ids) > 1:
        log.warning("multi-GPU training is not implemented: training on GPU %d only", ids[0])
    return device


@contextlib.contextmanager
def signal_effects(solver, sigint: str, sighup: str):
    """Turn SIGINT/SIGHUP into solver requests, checked between iterations (Caffe's
    SignalHandler): 'none' swallows the signal, as Caffe's handler does."""
    saved = {}

    def handler_for(effect):
        def handle(signum, frame):
            if effect != "none":
                solver.request(effect)

        return handle

    pairs = [(signal.SIGINT, sigint)]
    if hasattr(signal, "SIGHUP"):
        pairs.append((signal.SIGHUP, sighup))
    for signum, effect in pairs:
        saved[signum] = signal.signal(signum, handler_for(effect))
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def progress_bar(solver, enabled: bool):
    """A tqdm bar (iteration, loss, lr, images/s) fed by solver.callbacks; log lines are routed
    through tqdm.write meanwhile so they do not break the bar."""
    if not enabled:
        yield None
        return
    total = solver.param.max_iter
    bar = tqdm(total=total, initial=min(solver.iter, total), unit="it", dynamic_ncols=True)

    def update(iteration, loss, rate, images_per_second):  # iteration: the count done so far
        bar.set_postfix_str(
            f"loss={loss:.4g}, lr={rate:.3g}, {images_per_second:.1f} img/s", refresh=False
        )
        bar.update(max(0, min(iteration, total) - bar.n))

    solver.callbacks.append(update)
    try:
        with logging_redirect_tqdm(loggers=[get_logger()]):
            yield bar
    finally:
        solver.callbacks.remove(update)
        bar.close()


@click.command()
@option("solver", default="", help="The solver definition (prototxt) file.")
@option("weights", default="", help="Pretrained weights to fine-tune from, separated by ','.")
@option("snapshot", default="", help="A .solverstate(.h5) to resume training from.")
@option("gpu", default=None, help="GPU id(s) ('0', '0,1', 'all') or 'none' for the CPU; "
         "default: the solver's solver_mode/device_id.")  # fmt: skip
@option("level", type=int, default=0, help="Net state level (sets the solver's train_state).")
@option("stage", default="", help="Net state stages, separated by ','.")
@option("sigint_effect", type=_EFFECTS, default="stop", show_default=True,
         help="What SIGINT (Ctrl-C) does.")  # fmt: skip
@option("sighup_effect", type=_EFFECTS, default="snapshot", show_default=True,
         help="What SIGHUP does.")  # fmt: skip
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")  # fmt: skip
@click.option("--log", "-log", "log_file", default=None, metavar="FILE",
              help="Also write the log to FILE (for plot-log, Caffe's parse_log.py).")  # fmt: skip
@user_errors
def train(solver, weights, snapshot, gpu, level, stage, sigint_effect, sighup_effect, progress,
          log_file):  # fmt: skip
    """Train (or fine-tune, or resume) from a solver file, like ``caffe train``."""
    if not solver:
        raise click.UsageError("Need a solver definition to train (--solver).")
    if snapshot and weights:
        raise click.UsageError(
            "Give a snapshot to resume training or weights to finetune but not both."
        )
    with log_to_file(log_file):
        _train(solver, weights, snapshot, gpu, level, stage, sigint_effect, sighup_effect,
               progress)  # fmt: skip


@contextlib.contextmanager
def log_to_file(path: str | None):
    """Copy the log into ``path`` in glog's format while the block runs."""
    if not path:
        yield
        return
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(GlogFormatter())
    get_logger().addHandler(handler)
    try:
        yield
    finally:
        get_logger().removeHandler(handler)
        handler.close()


def _train(solver, weights, snapshot, gpu, level, stage, sigint_effect, sighup_effect, progress):
    log = get_logger()
    param = read_solver(solver)
    param.train_state.level = level  # caffe.cpp always sets it from --level
    param.train_state.stage.extend(_split(stage))
    device = _device_for(gpu_from_solver(gpu, param))
    if device.type == "cuda":
        param.device_id = device.index
    if snapshot or weights:
        del param.weights[:]
        if weights:
            param.weights.append(weights)
    runner = Solver(param, source_path=solver, device=device)
    if snapshot:
        log.info("Resuming from %s", snapshot)
        runner.restore(snapshot)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with signal_effects(runner, sigint_effect, sighup_effect), progress_bar(runner, show):
            log.info("Starting Optimization")
            runner.solve()
    finally:
        runner.close()
    log.info("Optimization Done.")


def fmt(value: float) -> str:
    """A float as C++'s default ostream prints it (6 significant digits, like %g)."""
    return f"{value:.6g}"


def score(net, feed, iterations: int, log) -> list[str]:
    """Run ``iterations`` batches; log each output value per batch, return the summary lines
    (mean over batches, with ``(* w = l loss)`` for loss outputs), as caffe.cpp's test()."""
    names = list(net.output_names)
    loss_weights = net.blob_loss_weights
    totals: list[float] = []
    owners: list[str] = []
    loss = 0.0
    with torch.no_grad():
        for i in range(iterations):
            outputs = net(**next(feed))
            loss += float(net.loss) if net.loss is not None else 0.0
            values = [(n, v) for n in names for v in outputs[n].detach().float().cpu().flatten()]
            for idx, (name, value) in enumerate(values):
                value = float(value)
                if i == 0:
                    totals.append(value)
                    owners.append(name)
                else:
                    totals[idx] += value
                log(f"Batch {i}, {name} = {fmt(value)}")
    lines = [f"Loss: {fmt(loss / iterations)}"]
    for name, total in zip(owners, totals):
        mean = total / iterations
        weight = loss_weights.get(name, 0.0)
        note = f" (* {fmt(weight)} = {fmt(weight * mean)} loss)" if weight else ""
        lines.append(f"{name} = {fmt(mean)}{note}")
    return lines


@click.command()
@option("model", default="", help="The net definition to score.")
@option("weights", default="", help="Trained weights, separated by ','.")
@option("iterations", type=int, default=50, show_default=True, help="Batches to run.")
@option("gpu", default=None, help="GPU id to run on (default: CPU).")
@option("level", type=int, default=0, help="Net state level.")
@option("stage", default="", help="Net state stages, separated by ','.")
@user_errors
def test(model, weights, iterations, gpu, level, stage) -> None:
    """Score a trained model on its TEST-phase data, like ``caffe test``."""
    if not model:
        raise click.UsageError("Need a model definition to score (--model).")
    if not weights:
        raise click.UsageError("Need model weights to score (--weights).")
    if iterations < 1:
        raise click.UsageError("--iterations must be at least 1.")
    log = get_logger()
    device = resolve_device(gpu)
    if device.type == "cpu":
        log.info("Use CPU.")
    else:
        log.info("Use GPU with device ID %d", device.index)
        log.info("GPU device name: %s", torch.cuda.get_device_name(device))
    net = Net.from_prototxt(model, "TEST", level=level, stages=_split(stage))
    net.load_weights(weights)
    net.to(device).eval()
    feed = make_feed(net, device=device)
    log.info("Running for %d iterations.", iterations)
    try:
        lines = score(net, feed, iterations, log.info)
    finally:
        feed.close()
    for line in lines:
        log.info(line)


@click.command("plot-log")
@click.argument("log_file")
@click.argument("output")
@click.option(
    "--csv",
    "write_csv",
    is_flag=True,
    help="Also write OUTPUT's stem + .train / .test CSV tables (parse_log.py's rows).",
)
@user_errors
def plot_log(log_file, output, write_csv) -> None:
    """Draw the loss, accuracy and learning-rate curves of a training LOG_FILE (ours or
    Caffe's) into OUTPUT (.png, .svg, .pdf)."""
    log = parse_log(log_file)
    if not (log.train or log.test or log.loss):
        raise click.ClickException(f"{log_file}: no training iterations found in the log")
    plot(log, output, title=os.path.basename(log_file))
    click.echo(f"{output}: {len(log.train)} train rows, {len(log.test)} test rows")
    if write_csv:
        stem = os.path.splitext(output)[0]
        write_table(log.train, stem + ".train")
        write_table(log.test, stem + ".test")
