"""A small net's chunk of training iterations as one compiled loop.

The captured step's chunks (captured.py) unroll their iterations into one graph: inductor's
code grows with each, so eight cost ten seconds of compile and a chunk call's own ~40 us is
shared by eight only. Here one iteration (forward, backward, Caffe's regularisation and
update) is traced once, by ``make_fx``, into a graph of aten operations with its gradients
written out, as a function of the state it changes (the parameters and the rule's histories);
``while_loop`` runs that graph over the rows of the stacked batches, carrying the state from
one to the next, and inductor compiles the loop with the body once, its C++ wrapper running
the loop. So a call runs up to ``LOOP`` iterations (as many as the feed reads ahead), the
count a tensor: a window cut short runs fewer, with no mask and no second graph.

Not for nets that draw random numbers (Dropout): the body's draws would repeat from one
iteration to the next; those keep the unrolled chunks.

A captured solver's small test nets score their passes the same way (``LoopedScores``): all
batches but the last as loops, the running sums of the outputs and the loss carried in
float32 in order, as scoring.score adds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..log import get_logger
from ..registry import step_tracing

log = get_logger()

# Iterations per call at most: the feed reads up to 64 batches ahead (data/loader.py; fewer
# of larger ones, and a chunk is no longer than what it reads ahead: captured.py ``_window``)
LOOP = 64
# Captured layer types whose forward draws random numbers
RANDOM_TYPES = frozenset({"Dropout"})


def _while_loop():
    try:  # (torch >= 2.3; inductor compiles it from 2.5 on)
        from torch._higher_order_ops.while_loop import while_loop
    except ImportError:
        return None
    return while_loop


def types_outside(net, types) -> list[str]:
    """The layer types of ``net`` not in ``types``, sources aside, sorted."""
    return sorted({kind for name, kind in zip(net.layer_names, net.layer_types)
                   if kind not in types and not net.layer(name).is_source})  # fmt: skip


def _why_not_a_loop(net) -> str | None:
    """What keeps any pass of ``net`` from a loop: random draws, or no while_loop."""
    randoms = sorted({kind for kind in net.layer_types if kind in RANDOM_TYPES})
    if randoms:
        return f"its {', '.join(randoms)} layers draw random numbers"
    if _while_loop() is None:
        return "this torch has no while_loop"
    return None


def _has_buffers(net) -> bool:
    return next(net.buffers(), None) is not None


def why_not_looped(net, update) -> str | None:
    """Why ``net``'s chunks cannot run as a loop (None: they can)."""
    learned = {id(p) for p in update.params}
    outside = any(id(p) not in learned for p in net.parameters()) or _has_buffers(net)
    return _why_not_a_loop(net) or ("it holds tensors outside the update" if outside else None)


def padded(stacked: dict, rows: int) -> dict:
    """``stacked`` (each top's batches on a new first axis) with its last batch repeated up
    to ``rows``: the static shape of a chunk cut short, whose extra rows change nothing."""
    count = len(next(iter(stacked.values())))
    if count == rows:
        return stacked
    return {top: torch.cat([t, t[-1:].expand(rows - count, *t.shape[1:])])
            for top, t in stacked.items()}  # fmt: skip


def unstacked(stacked: dict) -> list[dict]:
    """The batches of ``stacked``, one dict each (views)."""
    count = len(next(iter(stacked.values())))
    return [{top: t[k] for top, t in stacked.items()} for k in range(count)]


class _Running(nn.Module):
    """The net's forward loop as a module's forward, for ``functional_call``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net.run(dict(batch))


class _TracedLoop:
    """What both loops keep: the traced body by the batch's shapes and dtypes (a feed given by
    hand may change them), traced at their first call, and the count tensors by count."""

    def __init__(self):
        self._bodies: dict[tuple, object] = {}
        self._body = None  # the body the next call runs
        self._counts: dict[int, torch.Tensor] = {}

    def _select(self, stacked: dict, count: int, trace) -> torch.Tensor:
        """Make the body for ``stacked``'s shapes (``trace()`` where there is none yet) the
        one the next call runs; the count as a tensor."""
        shapes = tuple((top, t.shape[1:], t.dtype) for top, t in stacked.items())
        body = self._bodies.get(shapes)
        if body is None:
            body = self._bodies[shapes] = trace()
        self._body = body  # (dynamo guards on it: another body, another graph)
        tensor = self._counts.get(count)
        if tensor is None:
            tensor = self._counts[count] = torch.tensor(count)
        return tensor


class LoopedSteps(_TracedLoop):
    """``call(stacked, rates, count)``: the first ``count`` rows of ``stacked`` (each top's
    batches on a new first axis) trained on in order, row k at the local rates of row k of
    ``rates``; returns the row of losses (rows from ``count`` on: 0), or raises what tracing
    or compiling raised. ``captured`` is the CapturedStep whose net, update and rule it
    runs; ``compile(method)`` compiles the loop as it compiles its own steps."""

    def __init__(self, captured, compile):
        super().__init__()
        self.captured = captured
        self.while_loop = _while_loop()
        self._running = _Running(captured.net)
        first_names: dict[int, str] = {}
        for name, param in captured.net.named_parameters():
            first_names.setdefault(id(param), "net." + name)  # (shared blobs tie)
        self._names = [first_names[id(p)] for p in captured.update.params]
        self.compiled = compile(self._loop)

    def __call__(self, stacked: dict, rates: torch.Tensor, count: int) -> torch.Tensor:
        tensor = self._select(stacked, count, lambda: self._trace(stacked, rates))
        return self.compiled(stacked, rates, tensor)

    def _state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters and, flat, the rule's histories of each (in the update's order)."""
        params = self.captured.update.params
        math = self.captured.math
        return params, [h for i in range(len(params)) for h in math.histories(i)]

    def _trace(self, stacked: dict, rates: torch.Tensor):
        from torch.fx.experimental.proxy_tensor import make_fx  # (on use: the first trace)

        params, held = self._state()
        row = {top: t[0] for top, t in stacked.items()}

        def iteration(params, held, batch, rates):  # (make_fx counts a method's self)
            return self._iteration(params, held, batch, rates)

        with step_tracing():
            return make_fx(iteration)([p.detach() for p in params], list(held), row, rates[0])

    def _iteration(self, params, held, batch, rates):
        """One iteration as a function of its state: (the parameters after, their histories
        after, the loss); the captured step's arithmetic (captured.py ``_step``)."""
        update, math = self.captured.update, self.captured.math
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(o.requires_grad)
                      for p, o in zip(params, update.params)]  # fmt: skip
            loss = torch.func.functional_call(self._running, dict(zip(self._names, leaves)),
                                              (batch,))  # fmt: skip
            learned = [leaf for leaf in leaves if leaf.requires_grad]
            found = iter(torch.autograd.grad(loss, learned, allow_unused=True))
        after, changed, k = [], [], 0
        for i, (param, leaf) in enumerate(zip(params, leaves)):
            grad = next(found) if leaf.requires_grad else None
            grad = torch.zeros_like(param) if grad is None else grad  # a frozen blob's: 0
            if update.decays[i]:
                grad = grad + update.decays[i] * (param if update.l2 else torch.sign(param))
            n = len(math.histories(i))
            change, histories = math.updated(grad, rates[i], held[k : k + n])
            after.append(param - change)
            changed += histories
            k += n
        return after, changed, loss.detach()

    def _loop(self, batches: dict, rates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        params, held = self._state()
        body, n_params, n_held = self._body, len(params), len(held)

        def cond(k, *state):
            return k < count

        def step(k, *state):
            index = k.reshape(1)
            row = {top: t.index_select(0, index).squeeze(0) for top, t in batches.items()}
            after, changed, loss = body(list(state[:n_params]),
                                        list(state[n_params : n_params + n_held]), row,
                                        rates.index_select(0, index).squeeze(0))  # fmt: skip
            losses = state[-1].index_copy(0, index, loss.reshape(1).to(state[-1].dtype))
            return (k + 1, *after, *changed, losses)

        losses = torch.zeros(len(rates), dtype=params[0].dtype)
        out = self.while_loop(cond, step, (count.new_zeros(()), *(p.detach() for p in params),
                                           *held, losses))  # fmt: skip
        with torch.no_grad():
            for target, value in zip((*params, *held), out[1 : 1 + n_params + n_held]):
                target.copy_(value)
        return out[-1]


class _Scoring(nn.Module):
    """A test net's forward as a module's forward: (its loss, 0 without one; its outputs'
    values as float32, flat, in ``names`` order), as scoring.score reads them."""

    def __init__(self, net, names):
        super().__init__()
        self.net, self.names = net, list(names)

    def forward(self, batch: dict):
        blobs = dict(batch)
        loss = self.net.run(blobs)
        parts = [blobs[name].float().reshape(-1) for name in self.names]
        flat = torch.cat(parts) if parts else torch.zeros(0)
        return (loss if loss is not None else flat.new_zeros(())).float(), flat


def why_not_looped_test(net) -> str | None:
    """Why the test passes of ``net`` cannot run as a loop (None: they can)."""
    outside = _has_buffers(net)
    return _why_not_a_loop(net) or ("it holds tensors outside its parameters" if outside else None)


def looped_tests(nets, compile, types) -> dict:
    """The LoopedScores of each small test net of layer ``types`` that fits one (logged),
    by index."""
    looped = {}
    for index, net in enumerate(nets):
        why = why_not_looped_test(net) if net.one_thread() else "not a small net"
        others = types_outside(net, types)
        why = f"its {', '.join(others)} layers" if others and why is None else why
        if why is None:
            looped[index] = LoopedScores(net, net.output_names, compile)
        log.info("compile: test net #%d's passes %s", index,
                 "as compiled loops" if why is None else f"eagerly ({why})")  # fmt: skip
    return looped


class LoopedScores(_TracedLoop):
    """A test pass's batches (scoring.score) as compiled loops, up to ``LOOP`` batches per
    call: each batch's forward traced once (make_fx, over the parameters as inputs), its
    outputs added to the running sums and its loss to the running loss in order, in float32,
    as score adds them one by one. ``run(feed, count, stop)`` takes them from ``feed``."""

    def __init__(self, net, names, compile):
        super().__init__()
        self.net = net
        self.while_loop = _while_loop()
        self._module = _Scoring(net, names)
        self._names = ["net." + name for name, _ in net.named_parameters()]
        self.size = sum(math.prod(net.blob_shapes[name]) for name in names)
        self.compiled = compile(self._loop)
        self.broken = False

    def run(self, feed, count: int, stop):
        """Up to ``count`` batches of ``feed`` scored: (sums, loss, batches done, batches
        taken but not scored), fewer where the feed cannot hand them out stacked; None where
        ``stop()`` (asked before each call) ended the pass. A call that fails to trace or
        compile leaves its batches unscored and ``broken`` set (logged): the caller scores
        them and the rest eagerly, and drops the loop."""
        sums = torch.full((self.size,), -0.0)  # (-0.0 + x is x: the first batch's values)
        loss, done = torch.zeros(()), 0
        chunk = min(LOOP, feed.takes_at_most())
        while chunk > 1 and count - done > 0:
            if stop():
                return None
            n = min(chunk, count - done)
            stacked = feed.take(n)
            if stacked is None:
                break
            try:
                sums, loss = self._call(padded(stacked, chunk), sums, loss, n)
            except Exception as exc:  # (make_fx or the backend refused: eagerly from here)
                log.warning("compile: a test pass could not run as a loop (%s: %s); test "
                            "passes run eagerly", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
                self.broken = True
                return sums, loss, done, unstacked(stacked)
            done += n
        return sums, loss, done, []

    def _call(self, stacked: dict, sums, loss, count: int):
        tensor = self._select(stacked, count, lambda: self._trace(stacked))
        return self.compiled(stacked, sums, loss, tensor)

    def _trace(self, stacked: dict):
        from torch.fx.experimental.proxy_tensor import make_fx  # (on use: the first trace)

        def forward(params, batch):  # (make_fx counts a method's self)
            return torch.func.functional_call(self._module, dict(zip(self._names, params)),
                                              (batch,))  # fmt: skip

        params = [p.detach() for p in self.net.parameters()]
        with step_tracing(), torch.no_grad():
            return make_fx(forward)(params, {top: t[0] for top, t in stacked.items()})

    def _loop(self, batches: dict, sums, loss, count: torch.Tensor):
        params, body = [p.detach() for p in self.net.parameters()], self._body

        def cond(k, sums, loss):
            return k < count

        def step(k, sums, loss):
            index = k.reshape(1)
            row = {top: t.index_select(0, index).squeeze(0) for top, t in batches.items()}
            batch_loss, flat = body(params, row)
            return k + 1, sums + flat, loss + batch_loss

        out = self.while_loop(cond, step, (count.new_zeros(()), sums, loss))
        return out[1], out[2]
