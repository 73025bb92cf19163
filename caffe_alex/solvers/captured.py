"""The captured training step: a net's forward, backward and update (SGD, Nesterov, AdaGrad,
RMSProp, Adam) as one torch.compile'd function (the Solver's ``compile`` option, where it pays:
nets of inner products, activations and losses).

A tiny net's iteration is Python's, not arithmetic's: BVLC's brewing-logreg net spends ~0.5 ms
per iteration in dispatch, autograd's engine and the update's bookkeeping, for a few hundred
multiply-adds. Captured, forward, backward and update run as inductor's C++ without Python
between the ops (0.17 ms per Solver iteration; a bare PyTorch loop takes 0.26), and where no
blob is read between them a chunk of iterations runs as one call, their batches stacked: on a
small net, up to ``LOOP`` (64) iterations as one compiled loop over the step traced once
(looped.py); on one that draws random numbers (Dropout), ``CHUNK`` (8) steps unrolled into one
graph. A compiled call's own cost, some 40 us, is shared by the chunk; a tiny inner product
is traced as loops that inductor fuses with the loss and the update (inner_product.py), so
logreg's step is one C++ kernel, run by inductor's C++ wrapper; chunks follow each other
without the Solver's loop between them, their batches taken from the feed as views of what it
read ahead. Convolution
and pooling nets lose that way (inductor's kernels against oneDNN's: LeNet 23 -> 40 ms,
CIFAR-10 quick 110 -> 127 ms per iteration), so only nets of the layer types below are
captured; others get the ``compile`` option's per-net forward (nets.py). Larger nets of those
types gain less but still gain (an MLP 784-500-500-10 at batch 64: 2.5 -> 2.0 ms per
iteration; 784-1000-1000-10 at 256: 17.5 -> 16.1 ms).

Like every ``compile``, not Caffe's exact float32 steps: inductor fuses the update's
multiply-adds (an ulp apart from the eager path per step) and Dropout draws from its own
generator. Iterations whose blobs Python reads (a display, the last of a ``step``, hooks) and
the last batch of a test pass run the net eagerly (a small test net's other batches run as
compiled loops: looped.py), so ``net.blobs`` and the display show what they always show;
a chunk ends before them and before a snapshot (one cut short runs fewer rows of the loop,
or its last unrolled rows masked, so a small net needs no single-step graph), so the log, the
snapshots and their iterations are those of single steps. A stop or snapshot asked by a
signal is seen after the row of chunks under way (up to ``RUN_ITERATIONS``, 128 iterations,
a few milliseconds, later).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from ..log import get_logger
from .functional_rules import FunctionalRule
from .looped import LOOP, LoopedSteps, padded, types_outside, unstacked, why_not_looped
from .lr_policy import learning_rate

log = get_logger()
f32 = np.float32

# Layer types whose compiled forward and backward beat eager on small tensors (data layers,
# whose batches come from the feed, are captured whatever their type).
CAPTURED_TYPES = frozenset({
    "InnerProduct", "ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "ELU",
    "Dropout", "Eltwise", "Concat", "Slice", "Split", "Flatten", "Reshape", "Scale", "Bias",
    "Softmax", "SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "Accuracy",
    "Silence",
})  # fmt: skip
RULES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "Adam")  # (AdaDelta keeps its own loop)
# Iterations per compiled call where nothing reads the blobs between them (see ``run``)
CHUNK = 8


def inductor_options() -> dict:
    """What the captured step asks of inductor: its C++ wrapper (a call's buffers allocated and
    its kernel launched from C++, not Python: logreg's chunk 60 -> 40 us per call, the same
    compile time), and its graph cache for the loop (looped.py). The cache refuses a graph
    holding a higher-order op unless told, not knowing what such an op runs; while_loop runs
    the body and condition graphs it holds, which the cache key hashes with the graph (tested:
    a loop of another momentum is compiled anew), so a warm cache skips the loop's ~4 s of
    code generation. (A torch without that setting compiles the loop anew in each process.)"""
    import torch._inductor.config as config  # (inductor: imported where it is used)

    options = {"cpp_wrapper": True}
    if hasattr(config, "unsafe_marked_cacheable_functions"):
        options["unsafe_marked_cacheable_functions"] = {
            "torch.ops.higher_order.while_loop": "caffe-alex looped step"}
    return options


# Chunks run in a row without returning to the Solver's loop (its callbacks hear of the last),
# as many as make up RUN_ITERATIONS (a request, a signal's stop, waits for the row)
RUN_CHUNKS, RUN_ITERATIONS = 16, 128


def why_not_captured(param, net, device, precision, ranks, layerwise: bool) -> str | None:
    """Why the train step cannot be captured (None: it can)."""
    if layerwise:
        return "the nets run layer by layer (pycaffe's solvers)"
    if device.type != "cpu":
        return "it is captured on the CPU only"
    if param.type not in RULES:
        return f"the {param.type} update is not captured ({', '.join(RULES)} are)"
    if param.iter_size != 1 or param.clip_gradients >= 0:
        return "iter_size and clip_gradients run the update's own loop"
    if precision.autocast is not None or precision.channels_last:
        return "precision and channels_last run the net's own forward"
    if ranks.size > 1:
        return "several ranks sum their gradients between backward and update"
    if not any(step.loss_weights for step in net.steps):
        return "the net has no loss"
    if not any(info.lr_mult for info in net.learnable_params()):
        return "the net learns nothing (every lr_mult is 0)"
    others = types_outside(net, CAPTURED_TYPES)
    if others:
        return f"its {', '.join(others)} layers run faster eagerly"
    return None


def captures(solver, layerwise: bool) -> bool:
    """Whether the ``compile`` option captures ``solver``'s whole train step (logged)."""
    reason = why_not_captured(solver.param, solver.train_net, solver.device, solver.precision,
                              solver.ranks, layerwise)  # fmt: skip
    if reason:
        log.info("compile: the train net's forward is compiled; the step is not captured "
                 "whole: %s", reason)  # fmt: skip
        return False
    log.info("compile: the training step is captured whole (forward, backward, update)")
    return True


def _next_due(due, interval: int, start: int, stop: int) -> int:
    """The first iteration j in [start, stop) with ``due(j)`` (``due`` holds at most at the
    multiples of ``interval``, 0: never); ``stop`` where none."""
    interval = abs(interval)
    if interval:
        for j in range(-(-start // interval) * interval, stop, interval):
            if due(j):
                return j
    return stop


def _always(iteration: int) -> bool:
    return True


def _own_code(method):
    """``method`` bound to a copy of its function's code: dynamo keeps its graphs per code
    object and recompiles one at most ``recompile_limit`` (8) times, so every captured step
    sharing ``_step``'s code would leave the ninth solver of a process uncompiled."""
    func = method.__func__
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                             func.__defaults__, func.__closure__)  # fmt: skip
    return types.MethodType(own, method.__self__)


def _stacked(batches: list[dict]) -> dict | None:
    """Each top's batches stacked on a new first axis; None where they are not alike (a feed
    given by hand may change keys or shapes)."""
    keys = batches[0].keys()
    if not all(b.keys() == keys for b in batches):
        return None
    try:  # (tensors of one shape stack; others, or anything else, are refused by name)
        return {top: torch.stack([b[top] for b in batches]) for top in keys}
    except (TypeError, RuntimeError):
        return None


def schedule_of(solver, count: int) -> tuple[list[tuple[float, int]], int]:
    """(rate, iteration) of ``solver``'s next ``count`` iterations, and its lr_policy step
    after them."""
    param, first, step = solver.param, solver.iter, solver.current_step
    if param.lr_policy in ("fixed", "step"):  # a rate monotone in the iteration (gamma >= 0):
        rate, _ = learning_rate(param, first, step)  # one rate where both ends have it
        last, last_step = learning_rate(param, first + count - 1, step)
        if last == rate:
            return [(rate, first + k) for k in range(count)], last_step
    schedule = []
    for k in range(count):
        rate, step = learning_rate(param, first + k, step)
        schedule.append((rate, first + k))
    return schedule, step


def advance(solver, step: int, losses: torch.Tensor) -> None:
    """``solver`` after as many iterations as ``losses`` holds (one loss, or a chunk's row
    of them): its lr_policy step, their losses for the display, ``iter`` moved on."""
    solver.current_step = step
    solver._progress.loss.add_lazily(solver.iter, losses)
    solver.iter += losses.numel()


class CapturedStep:
    """``step(batch, rate, iteration)``: one training iteration of ``update``'s net (forward,
    backward, Caffe's regularisation and its rule's update of every learnable blob) on
    ``batch`` at learning rate ``rate``; returns the loss (detached), or None where the step
    failed to compile (nothing ran). Compiled at the first call.

    ``run(solver, left)`` runs up to ``chunk`` iterations in one call where none of them is
    read (a display, a test pass, a snapshot or the last of the ``step`` between them): the
    batches stacked, the steps a compiled loop (``looped``, looped.py) or unrolled into one
    graph with the rows past the iterations masked. One call costs some 40 us before any
    arithmetic (dynamo's frame and guards, AOTAutograd's wrapper, the buffers inductor's
    wrapper allocates); ``chunk`` iterations share it."""

    def __init__(self, net, update, backend=True, chunk: int = CHUNK):
        self.net, self.update, self.rule = net, update, update.rule
        self.param = p = update.param
        self.kind = p.type
        self.math = FunctionalRule(update.rule, p)  # the rule's arithmetic, out of place
        from torch._dynamo.exc import BackendCompilerFailed  # (dynamo: a second to import)

        self._compile_failed = BackendCompilerFailed
        backend = "inductor" if backend is True else backend  # (the compile option's value)
        options = inductor_options() if backend == "inductor" else None

        def compile(method):
            return torch.compile(_own_code(method), backend=backend, dynamic=False,
                                 options=options)  # fmt: skip

        self.compile = compile  # (the looped test passes compile theirs alike)
        self.compiled, self.compiled_chunk = compile(self._step), compile(self._steps)
        # dynamo traces torch.autograd.grad only when told to; set for the tracing alone
        self._tracing_config = torch._dynamo.config.patch(trace_autograd_ops=True)
        # a larger net's iteration is arithmetic: a call's ~0.1 ms is not worth a larger compile
        why = why_not_looped(net, update) if net.one_thread() else "not a small net"
        self.looped = LoopedSteps(self, compile) if why is None and chunk else None
        self.chunk = (LOOP if self.looped else chunk) if net.one_thread() else 0
        if self.chunk:
            log.info("compile: up to %d iterations per call, %s", self.chunk,
                     "as one loop" if self.looped else f"unrolled ({why})")  # fmt: skip
        self.calls = self.chunks = 0  # compiled calls made: single steps, chunks
        self.unrolled = 0  # of those chunks, unrolled ones (its first call traces autograd.grad)
        self._rates: dict = {}  # the rates tensors lately used, by their values
        self._active: dict = {}  # a chunk's row mask, by its length and the rows it runs

    def __call__(self, batch: dict, rate: float, iteration: int = 0) -> torch.Tensor | None:
        rates = self._local_rates([(rate, iteration)])
        loss = self._call(self.compiled, self.calls, "step", batch, rates[0])
        self.calls += loss is not None
        return loss

    def _local_rates(self, schedule: list[tuple[float, int]]) -> torch.Tensor:
        """The local rates of each blob as Caffe rounds them (float32 rate x float32 lr_mult;
        Adam's times its bias correction at the iteration), one row per (rate, iteration) of
        ``schedule``, as a tensor: a rate that changes (lr_policy, Adam's correction) is an
        input, not a recompile."""
        if self.kind == "Adam":
            rows = []
            for rate, iteration in schedule:
                self.rule.iter = iteration
                rows.append((rate, f32(self.rule.correction())))
        else:
            rows = [(rate, 1.0) for rate, _ in schedule]
        key = tuple(rows)
        if key not in self._rates:
            if len(self._rates) > 16:  # (an Adam or a changing rate: each chunk its own)
                self._rates.clear()
            blobs = range(len(self.update.params))
            self._rates[key] = (torch.tensor([[float(f32(self.rule.local_rate(i, rate)) * c)
                                               for i in blobs] for rate, c in rows]))  # fmt: skip
        return self._rates[key]

    def _call(self, compiled, calls: int, what: str, *args) -> torch.Tensor | None:
        # dynamo reads the config when it traces: at the first call (a recompile later would
        # break the graph at autograd.grad, which still computes the same numbers)
        try:
            if calls:
                return compiled(*args)
            with self._tracing_config:
                return compiled(*args)
        except self._compile_failed as exc:  # no working C++ compiler, say: nothing ran
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("compile: the captured training %s failed to compile (%s); the "
                        "iterations run %s", what, first_line,
                        "one by one" if what == "chunk" else "eagerly")  # fmt: skip
            return None

    def run(self, solver, left: int = 1) -> tuple[float | None, list[dict]]:
        """Iterations of ``solver`` (the Solver training ``net``) through the captured step:
        the batch from its feed, the rate of its schedule, the loss for its display, ``iter``
        moved on. On a small net (``chunk`` > 1) as chunks: up to ``chunk`` iterations per
        call, as many as the ``left`` iterations of its ``step`` and the next display, test
        pass or snapshot allow (see ``_window``; a chunk cut short has its rows after them
        masked: they change nothing), and up to ``RUN_CHUNKS`` such calls in a row while
        nothing falls between them that the Solver's loop must see (those, a request, the
        end of the step); else one iteration. Returns the last rate and no batch; or, where
        a step failed to compile, no rate and the batches it drew but did not train on (the
        caller trains them eagerly, one iteration each)."""
        count = self._window(solver, left)
        if not count:
            batch = next(solver.feeds["train"])
            rate = self._one(solver, batch)
            return rate, [] if rate is not None else [batch]
        feed, rate = solver.feeds["train"], None
        for _ in range(max(min(RUN_CHUNKS, RUN_ITERATIONS // self.chunk), 1)):
            stacked, batches = self._draw(solver, feed, count)
            rate = self._chunk(solver, stacked, count) if stacked is not None else None
            if rate is None:  # one by one
                batches = batches if batches is not None else unstacked(stacked)
                for k, batch in enumerate(batches):
                    rate = self._one(solver, batch)
                    if rate is None:  # a shape that failed to compile: the rest go eagerly
                        return None, batches[k:]
                return rate, []
            left -= count
            count = self._window(solver, left, after_chunk=True)
            if not count:
                break
        return rate, []

    def _draw(self, solver, feed, count: int) -> tuple[dict | None, list[dict] | None]:
        """The next ``count`` batches: (stacked, None) where the feed hands them out read
        ahead together (views), else (stacked or None where they do not stack, the list)."""
        stacked = feed.take(count)
        if stacked is not None:
            return stacked, None
        batches = []
        try:
            while len(batches) < count:
                batches.append(next(feed))
        except StopIteration:  # a feed given by hand ran out: train on what it gave first
            for batch in batches:
                self._one(solver, batch)
            raise
        return _stacked(batches), batches

    def _chunk(self, solver, stacked: dict, count: int) -> float | None:
        """The ``count`` batches of ``stacked`` (each top's stacked on a new first axis)
        trained on in one call, in rows of ``chunk`` (the rows after ``count`` masked); the
        last iteration's rate, or None where the chunk failed to compile (no more chunks
        then): nothing ran, the caller runs them one by one."""
        chunk = self.chunk
        schedule, step = schedule_of(solver, count)
        if count < chunk:  # (the last batch and rate again in the masked rows)
            stacked = padded(stacked, chunk)
            schedule = schedule + [schedule[-1]] * (chunk - count)
        if self.looped is not None:
            losses = self._looped(stacked, self._local_rates(schedule), count)
        else:
            active = self._active.get((chunk, count))
            if active is None:
                active = self._active[chunk, count] = torch.arange(chunk) < count
            losses = self._call(self.compiled_chunk, self.unrolled, "chunk", stacked,
                                self._local_rates(schedule), active)  # fmt: skip
            self.chunk = self.chunk if losses is not None else 0
            self.unrolled += losses is not None
        if losses is None:
            return None
        self.chunks += 1
        if solver._progress.batch_size is None:
            solver._progress.see_batch({top: t[0] for top, t in stacked.items()})
        advance(solver, step, losses[:count] if count < chunk else losses)
        return schedule[count - 1][0]

    def _looped(self, stacked: dict, rates: torch.Tensor, count: int) -> torch.Tensor | None:
        """The looped chunk's call (looped.py); None where its step could not be traced or
        failed to compile (logged; the chunks are unrolled from then on)."""
        try:
            losses = self._call(self.looped, self.chunks, "chunk", stacked, rates, count)
        except Exception as exc:  # (make_fx refuses in many ways; the unrolled chunk remains)
            log.warning("compile: the training step could not be traced as one loop (%s: %s)",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            losses = None
        if losses is None:
            log.warning("compile: the chunks are unrolled from now on")
            self.looped, self.chunk = None, min(self.chunk, CHUNK)
        return losses

    def _one(self, solver, batch: dict) -> float | None:
        """``batch`` trained on by the single step; its rate, or None where it failed to
        compile (nothing ran)."""
        solver._progress.see_batch(batch)
        schedule, step = schedule_of(solver, 1)
        loss = self(batch, *schedule[0])
        if loss is None:
            return None
        advance(solver, step, loss)
        return schedule[0][0]

    def _window(self, solver, left: int, after_chunk: bool = False) -> int:
        """How many iterations from ``solver.iter`` the next chunk may run (0: none, a single
        step or the Solver's loop): up to ``chunk``, leaving the last of the ``left``
        iterations of the step (its blobs are read after it), ending where a display, a test
        pass or a snapshot is due (the iteration before it, or the one after which it is
        taken, is a chunk's last). ``after_chunk``: straight after another chunk, without the
        Solver's loop between them, so the first of them must be free too, and no request
        (a signal's stop or snapshot) waiting."""
        chunk, first = self.chunk, solver.iter
        if chunk < 2 or left < 2 or (after_chunk and solver._requests.pending):
            return 0
        ahead = solver.feeds["train"].takes_at_most()  # (more: drawn one by one and copied)
        if 1 < ahead < chunk:  # the feed's read-ahead: large batches, fewer at once
            self.chunk = chunk = ahead
        param = solver.param
        events = ((solver._progress.due, param.display), (solver._tests.due, param.test_interval),
                  (_always, param.snapshot))  # fmt: skip
        start, stop = first + 1 - after_chunk, min(first + chunk, first + left - 1)
        for due, interval in events:  # (the first iteration from ``start`` with one due)
            stop = min(stop, _next_due(due, interval, start, stop))
        return stop - first  # (0 after a chunk where one is due at ``first`` itself)

    def _steps(self, batches: dict, rates: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``len(rates)`` steps in a row, step k on row k of each stacked batch; a step whose
        ``active`` is False changes nothing (a chunk cut short)."""
        losses = [self._step({top: t[k] for top, t in batches.items()}, rates[k], active[k])
                  for k in range(len(rates))]  # fmt: skip
        return torch.stack(losses)

    def _step(self, batch: dict, rates: torch.Tensor, active=None) -> torch.Tensor:
        params = self.update.params
        learned = [i for i, p in enumerate(params) if p.requires_grad]
        loss = self.net.run(dict(batch))
        found = torch.autograd.grad(loss, [params[i] for i in learned], allow_unused=True)
        grads = [torch.zeros_like(p) for p in params]  # Caffe's diff of a frozen blob: 0
        for i, grad in zip(learned, found):
            if grad is not None:
                grads[i] = grad
        decays, l2, math = self.update.decays, self.update.l2, self.math
        with torch.no_grad():
            for i, (param, grad) in enumerate(zip(params, grads)):
                if decays[i]:
                    grad = grad + decays[i] * (param if l2 else torch.sign(param))
                held = math.histories(i)
                change, after = math.updated(grad, rates[i], held)
                if active is not None:  # a masked row: histories kept, nothing subtracted
                    after = [torch.where(active, new, old) for new, old in zip(after, held)]
                    change = torch.where(active, change, 0.0)
                for history, new in zip(held, after):
                    history.copy_(new)
                param.sub_(change)
        return loss.detach()
