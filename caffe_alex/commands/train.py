"""``caffe-alex train`` and ``caffe-alex test``: Caffe's ``caffe train`` / ``caffe test`` flags,
log lines and signal effects, over caffe_alex.solvers.Solver and caffe_alex.net.Net.

``train`` on several GPUs (``--gpu 0,1``, ``--gpu all``) starts one process per GPU itself
(caffe_alex.solvers.distributed.launch); under torchrun (RANK, WORLD_SIZE... set) each process
is one rank. Either way every process runs ``_train``, the same code as a single process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import sys

import click
import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..formats.prototxt import read_solver
from ..log import GlogFormatter, get_logger, setup_logging
from ..net import Net
from ..solvers import Solver, distributed
from ..solvers.devices import choose_device, gpu_ids, gpu_spec
from ..solvers.feeds import name_the_record
from ..solvers.scoring import score as score_batches
from ..tools.tensorboard import check_folder, summary_writer, training_events
from .options import error_line, option, user_errors

_EFFECTS = click.Choice(["stop", "snapshot", "none"])
# what every rank must be given alike (compared across ranks at the start)
_SHARED_OPTIONS = ("weights", "snapshot", "level", "stage", "precision", "channels_last",
                   "compile_net")  # fmt: skip


def _split(value: str) -> list[str]:
    return [s for s in (value or "").split(",") if s]


def _gpus(opts: dict, solver_param) -> tuple[list[int], str, bool]:
    """(GPU ids, the --gpu value they come from, whether --gpu gave it) for this machine."""
    spec = gpu_spec(opts["gpu"], solver_param)
    ids = gpu_ids(spec)
    if len(set(ids)) != len(ids) and opts["dist_backend"] != "gloo":
        raise CaffeAlexError(f"--gpu {spec}: a GPU is listed twice (NCCL needs one process per "
                             "GPU; --dist-backend gloo lets processes share one)")  # fmt: skip
    return ids, spec or "", bool(opts["gpu"])


def _device_for(opts: dict, solver_param, ranks) -> tuple[torch.device, list[int]]:
    """This process's device: the GPU of its local rank (torchrun or --gpu 0,1), else the
    single GPU named, else the CPU; and the GPU ids named."""
    ids, spec, given = _gpus(opts, solver_param)
    return _pick(ids, spec, given, ranks), ids


def _pick(ids: list[int], spec: str, given: bool, ranks) -> torch.device:
    if not ids:
        return torch.device("cpu")
    if ranks is None:
        return torch.device("cuda", ids[0])
    if len(ids) == ranks.local_size:
        return torch.device("cuda", ids[ranks.local_rank])
    if spec == "all" or not given:  # the solver's GPU mode, or all: one GPU per local rank
        if ranks.local_rank >= torch.cuda.device_count():
            raise CaffeAlexError(
                f"{ranks.local_size} processes run on this node but it has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", ranks.local_rank)
    raise CaffeAlexError(
        f"--gpu {spec} names {len(ids)} GPU(s) but {ranks.local_size} processes run on this node: "
        "give one id per process (e.g. --gpu 0,1) or --gpu all"
    )


def _log_devices(device: torch.device, world, ids: list[int]) -> None:
    """Caffe's lines for the device choice, and the shape of a multi-process run."""
    log = get_logger()
    if device.type == "cpu":
        log.info("Use CPU.")
    else:
        shown = ids if world is not None and len(ids) == world.size else [device.index]
        log.info("Using GPUs %s", ", ".join(map(str, shown)))
        for index in shown:
            log.info("GPU %d: %s", index, torch.cuda.get_device_name(index))
    if world is not None:
        log.info("Training on %d ranks (%s; each runs the solver's batch_size, so the effective "
                 "batch is ranks x batch_size x iter_size); collectives time out after %g s",
                 world.size, world.backend, world.timeout)  # fmt: skip


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

    update.reads_blobs = False  # (the iterations between displays may skip what it does not read)
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
@option("precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
        show_default=True, help="Forward passes under bf16/fp16 autocast (fp16 with loss "
        "scaling); Caffe's numbers are fp32.")  # fmt: skip
@option("channels-last", is_flag=True, help="NHWC memory order for convolutions (faster on "
        "tensor cores; not Caffe's summation order).")  # fmt: skip
@click.option("--compile", "-compile", "compile_net", is_flag=True,
              help="torch.compile the nets (the first iterations compile); the whole training "
              "step of a net of inner products, activations and losses (of a small one, eight "
              "iterations per call).")  # fmt: skip
@option("dist-timeout", type=click.FloatRange(0, min_open=True),
        default=distributed.DEFAULT_TIMEOUT, show_default=True,
        help="Seconds a rank waits for the others (several GPUs, torchrun) before it stops with "
        "an error; longer than a test pass, during which the other ranks wait.")  # fmt: skip
@option("dist-backend", type=click.Choice(["nccl", "gloo"]), default=None,
        help="torch.distributed backend (default: nccl for GPUs, gloo for CPUs).")  # fmt: skip
@click.option("--tensorboard", default=None, metavar="DIR", help="Also write the loss, test "
              "outputs, learning rate and images/s as TensorBoard events into DIR.")  # fmt: skip
@user_errors
def train(**opts):
    """Train (or fine-tune, or resume) from a solver file, like ``caffe train``; on several GPUs
    (--gpu 0,1 or all) one process per GPU; under torchrun, one rank per process."""
    if not opts["solver"]:
        raise click.UsageError("Need a solver definition to train (--solver).")
    if opts["snapshot"] and opts["weights"]:
        raise click.UsageError(
            "Give a snapshot to resume training or weights to finetune but not both."
        )
    opts["debug"] = bool(click.get_current_context().find_root().params.get("debug"))
    if opts["tensorboard"]:  # an unusable folder or a missing package stops before any work
        summary_writer()
        check_folder(opts["tensorboard"])
    if distributed.ranks_from_env() is None:
        ids, _, _ = _gpus(opts, read_solver(opts["solver"]))
        if len(ids) > 1:  # Caffe's multi-GPU training: one process (rank) per GPU
            distributed.launch(_rank_main, (opts,), nprocs=len(ids), timeout=opts["dist_timeout"],
                               names=[f"GPU {i}" for i in ids])  # fmt: skip
            return
    _train(opts)


def _rank_main(opts: dict) -> None:
    """One process started by ``launch``: the command's body with its one-line errors."""
    setup_logging()
    if opts["debug"]:
        _train(opts)
        return
    try:
        _train(opts)
    except Exception as exc:
        line = error_line(exc)
        if line is None:
            raise
        click.echo(f"caffe-alex: error: {line}", err=True)
        sys.exit(1)


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


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _train(opts: dict) -> None:
    """Train in this process: alone, or as one rank of several (torchrun or ``launch``)."""
    param = read_solver(opts["solver"])
    param.train_state.level = opts["level"]  # caffe.cpp always sets it from --level
    param.train_state.stage.extend(_split(opts["stage"]))
    ranks = distributed.ranks_from_env()
    device, ids = _device_for(opts, param, ranks)
    world = None
    if ranks is not None:
        world = distributed.World.start(ranks, device, backend=opts["dist_backend"],
                                        timeout=opts["dist_timeout"])  # fmt: skip
    try:
        if world is not None:
            if not world.is_root:
                get_logger().setLevel(logging.WARNING)  # Caffe logs from the first solver only
            with open(opts["solver"], "rb") as f:
                solver_digest = _digest(f.read())
            shared = repr([opts[k] for k in _SHARED_OPTIONS]).encode()
            world.check_same({"the solver file": solver_digest, "the options": _digest(shared)})
        root = world is None or world.is_root
        with log_to_file(opts["log_file"] if root else None):
            _log_devices(device, world, ids)
            _solve(opts, param, device, world)
    finally:
        if world is not None:
            world.close()


def _solve(opts: dict, param, device, world) -> None:
    log = get_logger()
    if device.type == "cuda":
        param.device_id = device.index
    if opts["snapshot"] or opts["weights"]:
        del param.weights[:]
        if opts["weights"]:
            param.weights.append(opts["weights"])
    runner = Solver(param, source_path=opts["solver"], device=device, world=world,
                    precision=opts["precision"], channels_last=opts["channels_last"],
                    compile=opts["compile_net"])  # fmt: skip
    try:
        if opts["snapshot"]:
            log.info("Resuming from %s", opts["snapshot"])
            runner.restore(opts["snapshot"])
        show = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
        show = show and runner.is_root
        effects = signal_effects(runner, opts["sigint_effect"], opts["sighup_effect"])
        events = training_events(opts["tensorboard"] if runner.is_root else None, log,
                                 _images_per_iteration(runner, world))  # fmt: skip
        with effects, progress_bar(runner, show), events:
            log.info("Starting Optimization")
            runner.solve()
    finally:
        runner.close()
    log.info("Optimization Done.")


def _images_per_iteration(runner, world) -> int | None:
    """Images one iteration takes over all ranks (batch x iter_size x ranks), where the train
    net's first input says its batch size."""
    net = runner.train_net
    shape = net.blob_shapes[net.input_names[0]] if net.input_names else ()
    if not shape:
        return None
    return shape[0] * runner.param.iter_size * (world.size if world is not None else 1)


def as_ostream(value: float) -> str:
    """A float as C++'s default ostream prints it (6 significant digits, like %g)."""
    return f"{value:.6g}"


def score(net, feed, iterations: int, log) -> list[str]:
    """Run ``iterations`` batches; log each output value per batch, return the summary lines
    (mean over batches, with ``(* w = l loss)`` for loss outputs), as caffe.cpp's test(). The
    loop is the solver's (scoring.py: float32 sums, as Caffe's)."""
    names = list(net.output_names)
    owners = [n for n in names for _ in range(int(np.prod(net.blob_shapes[n], dtype=np.int64)))]

    def forward(batch):
        try:
            outputs = net(**batch)
        except CaffeAlexError as exc:  # a bad label: say which record it came from
            name_the_record(exc, feed)
            raise
        return outputs, net.loss if net.loss is not None else torch.zeros(())

    def each(i, values):
        for name, value in zip(owners, values):
            log(f"Batch {i}, {name} = {as_ostream(float(value))}")

    scores = score_batches(forward, feed, iterations, names, each=each)
    loss_weights = net.blob_loss_weights
    lines = [f"Loss: {as_ostream(float(scores.loss / np.float32(iterations)))}"]
    for name, mean in zip(owners, scores.means):
        weight = np.float32(loss_weights.get(name, 0.0))
        note = f" (* {as_ostream(weight)} = {as_ostream(weight * mean)} loss)" if weight else ""
        lines.append(f"{name} = {as_ostream(float(mean))}{note}")
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
    device = choose_device(gpu)
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
