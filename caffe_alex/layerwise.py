"""Caffe's own way of running a net's plan: persistent blobs, one layer at a time.

``net.py`` builds the plan (``Net.steps``) and runs it as one autograd graph (training, export).
``BlobExecutor`` runs the same plan through the same loop (``Net.run``) the way Caffe's Net
does, for pycaffe's ``caffe.Net``, its solvers and ``caffe-alex time``:

- every blob is a persistent ``Blob`` whose ``data`` and ``diff`` Python reads and writes; a
  layer's output becomes its top's tensor (copied into the old memory only where Python holds
  an array of it, so that array shows the new values, as Caffe's reused memory does);
- ``forward(first, last)`` is Caffe's ForwardFromTo; ``backward(first, last)`` its
  BackwardFromTo: each layer's backward is computed from the data its bottoms hold now and the
  diffs its tops hold now, so a backward with no forward before it, a range of layers, a diff
  written by hand or a blob's data changed in between all give what Caffe gives. A layer's
  forward keeps its autograd graph (Caffe keeps its internal buffers) and its backward reuses it
  while its bottoms, tops and parameters are as that forward left them; otherwise the layer's
  forward runs again on the current bottoms under the random state of its last forward (so
  Dropout keeps its mask, as Caffe's keeps rand_vec_), its buffers (BatchNorm's running
  averages) restored after it;
- which layers and bottoms get a backward is Caffe's Net::Init analysis (``BackwardNeeds``):
  blobs that lead to a loss, parameters with a nonzero lr_mult, propagate_down, force_backward
  (a loss layer's labels excepted, AllowForceBackward);
- a bottom's diff is overwritten by the layer that reads it (Caffe's implicit Split layers sum
  the diffs of a blob read twice; without them, the readers of one blob add up, as the Splits
  would); parameter diffs accumulate until cleared;
- a layer with ``blob_forward``/``blob_backward`` (the Python layer) gets the net's own Blob
  objects, as a Python layer's bottom and top are Caffe's blobs.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .blob import Blob, ParamBlob
from .net import Net

HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward")


class BackwardNeeds:
    """Caffe's Net::Init analysis of which layers run backward (``layer``), which of their
    bottoms get a diff (``bottom``) and which of their parameters (``param``).
    ``outputs_as_losses``: every layer counts as leading to a loss (``caffe-alex time`` times
    the backward of nets without one, from their outputs)."""

    def __init__(self, net: Net, outputs_as_losses: bool = False):
        lr = {(p.layer, p.index): p.lr_mult for p in net.param_infos}
        steps = net.steps
        blob_need: dict[str, bool] = {}
        self.layer: list[bool] = []
        self.bottom: list[list[bool]] = []
        self.param: list[list[bool]] = []
        for position, step in enumerate(steps):
            given = net.net_param.layer[position].propagate_down
            need = any(blob_need.get(b, False) for b in step.bottoms)
            bottoms = [bool(given[j]) if given else blob_need.get(b, False)
                       for j, b in enumerate(step.bottoms)]  # fmt: skip
            layer = net.layers[step.key]
            params = [lr.get((step.layer, j), 1.0) != 0 for j in range(len(layer.blobs))]
            need = need or any(params)
            for top in step.tops:
                blob_need[top] = need
            self.layer.append(need)
            self.bottom.append(bottoms)
            self.param.append(params)
        if not outputs_as_losses:
            self._prune(steps)
        if net.net_param.force_backward:
            self._force(net)

    def _prune(self, steps) -> None:
        # blobs that do not lead to a loss need no diff; a layer all of whose tops skip
        # backward skips it too (Net::Init's backward pass over the layers)
        under_loss: set[str] = set()
        skipped: set[str] = set()
        for position in range(len(steps) - 1, -1, -1):
            step = steps[position]
            weighted = {index for index, _ in step.loss_weights}
            contributes = any(i in weighted or t in under_loss for i, t in enumerate(step.tops))
            skip_all = all(t in skipped for t in step.tops)
            if self.layer[position] and skip_all:
                self.layer[position] = False
                self.bottom[position] = [False] * len(step.bottoms)
            if not contributes:
                self.layer[position] = False
            for j, name in enumerate(step.bottoms):
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom[position][j] = False
                if not self.bottom[position][j]:
                    skipped.add(name)

    def _force(self, net: Net) -> None:
        for position, step in enumerate(net.steps):
            layer = net.layers[step.key]
            self.layer[position] = True
            self.bottom[position] = [need or layer.allow_force_backward(j)
                                     for j, need in enumerate(self.bottom[position])]  # fmt: skip
            self.param[position] = [True] * len(self.param[position])

    def blobs(self, steps) -> set[str]:
        """The blobs some layer computes a diff for."""
        return {b for s, need in zip(steps, self.bottom) for b, n in zip(s.bottoms, need) if n}


class _Record:
    """What a layer's last forward left for its backward: the bottoms as autograd leaves, the
    outputs (with their graph), the random state it drew from, and the stamps of the bottoms it
    read and of its parameters, which say whether they still hold what it read. (Its tops are
    not stamped: the graph sees their memory, so a top's data written by hand is what a backward
    that reads it gets, as in Caffe; an in-place layer after it replaces the blob's tensor.)"""

    __slots__ = ("leaves", "outputs", "rng", "stamps")

    def __init__(self, leaves, outputs, rng, stamps):
        self.leaves, self.outputs, self.rng, self.stamps = leaves, outputs, rng, stamps


class _LiveBlobs(Mapping):
    """The executor's blobs as ``Net.run`` reads them: name -> the values the layers use. The
    executor writes each layer's tops itself (before its after_forward callbacks run), so the
    loop's own writes are ignored."""

    def __init__(self, blobs: dict[str, Blob]):
        self._blobs = blobs

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._blobs[name].data_tensor()

    def __setitem__(self, name: str, value) -> None:
        pass

    def __iter__(self):
        return iter(self._blobs)

    def __len__(self) -> int:
        return len(self._blobs)


class BlobExecutor:
    """Runs ``net``'s plan over persistent blobs, as Caffe's Net (see the module's notes).

    ``blobs``: name -> Blob, in Caffe's order; ``param_blobs[position]``: the layer's learnable
    blobs as ParamBlobs; ``hooks``: lists of callbacks ``f(position)`` under HOOKS;
    ``needs``: the BackwardNeeds; ``source``: a callable giving the next batch (name ->
    tensor) of the data layers, drawn once per forward that runs one."""

    def __init__(self, net: Net, device=None, source=None, outputs_as_losses: bool = False):
        self.net = net
        self.steps = net.steps
        self.device = torch.device(device) if device is not None else _device_of(net)
        self.source = source
        self.hooks: dict[str, list] = {kind: [] for kind in HOOKS}
        self.needs = BackwardNeeds(net, outputs_as_losses)
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        for step in self.steps:
            for top in step.tops:
                if top not in self.blobs:
                    shape = net.blob_shapes[top]
                    self.blobs[top] = Blob(torch.zeros(shape, device=self.device))
        self.seed_loss_diffs(outputs_as_losses)
        self.param_blobs = [[ParamBlob(_param_getter(net, step.key, j))
                             for j in range(len(net.layers[step.key].blobs))]
                            for step in self.steps]  # fmt: skip
        self._records: dict[int, _Record] = {}
        self._live = _LiveBlobs(self.blobs)
        self._batch, self._given = None, False
        self._record = True
        self._writers = self._bottom_versions()
        self._python = [hasattr(net.layers[s.key], "blob_forward") for s in self.steps]
        self._backward = [need and not net.layers[s.key].is_source
                          for s, need in zip(self.steps, self.needs.layer)]  # fmt: skip

    def seed_loss_diffs(self, outputs_as_losses: bool = False) -> None:
        """Caffe's SetLossWeights: a loss top's diff holds its loss weight (``outputs_as_losses``
        without any loss: every output's diff is 1)."""
        weights = self.net.blob_loss_weights
        if outputs_as_losses and not any(weights.values()):
            weights = dict.fromkeys(self.net.output_names, 1.0)
        for name, weight in weights.items():
            if weight and name in self.blobs:
                self.blobs[name].diff_tensor().fill_(weight)

    def _bottom_versions(self) -> list[list[tuple[str, int]]]:
        """Each bottom as (name, position of the layer that wrote that version of it): two
        readers of one version share a diff, an in-place layer writes a new version."""
        writer: dict[str, int] = {}
        out = []
        for position, step in enumerate(self.steps):
            out.append([(b, writer.get(b, -1)) for b in step.bottoms])
            for top in step.tops:
                writer[top] = position
        return out

    # -- forward --------------------------------------------------------------------------
    def forward(self, first: int = 0, last: int | None = None, batch=None,
                record: bool = True) -> torch.Tensor | None:  # fmt: skip
        """Caffe's ForwardFromTo over positions ``first``..``last``; returns their loss (a
        tensor, None without loss tops). ``batch``: the data layers' tops (name -> tensor)
        instead of the next one from ``source``; ``record`` False: no backward will follow (a
        test pass), so no layer keeps a graph."""
        self._batch, self._given = batch, batch is not None
        self._record = record and torch.is_grad_enabled()  # (torch.no_grad around: no graph)
        self.sync_params(first, last)
        try:
            with self.net.threads():  # a small net on one thread (Net.thread_policy)
                loss = self.net.run(self._live, first, last, call=self._forward_layer)
        finally:
            self._batch = None
        return loss.detach() if loss is not None else None

    def sync_params(self, first: int = 0, last: int | None = None) -> None:
        """Values Python wrote to a GPU net's host copy of the parameters, into the net."""
        for blob in _flatten(self.param_blobs[first : None if last is None else last + 1]):
            blob.sync()

    def has_python_layer(self) -> bool:
        """A layer runs its own blob_forward/blob_backward (a Python layer)."""
        return any(self._python)

    def _forward_layer(self, position: int, layer, bottoms):
        self._run_hooks("before_forward", position)
        step = self.steps[position]
        if bottoms is None:  # a source: Input keeps what Python wrote, a data layer reads
            self._fill_source(step, layer)
            out = None
        elif self._python[position]:
            self._records.pop(position, None)
            out = layer.blob_forward([self.blobs[b] for b in step.bottoms],
                                     [self.blobs[t] for t in step.tops])  # fmt: skip
        else:
            out = self._autograd_forward(position, step, layer, bottoms)
        self._run_hooks("after_forward", position)
        return out

    def _fill_source(self, step, layer) -> None:
        """A batch given to ``forward`` fills every source layer's tops it names; else a data
        layer draws from ``source`` and an Input layer keeps what Python wrote into it."""
        if self._given:
            tops = [t for t in step.tops if t in self._batch]
        elif self.source is None or layer.type_name == "Input":
            return
        else:
            if self._batch is None:
                self._batch = self.source()
            tops = step.tops
        for top in tops:
            self.blobs[top].put(self._batch[top].to(self.device))

    def _autograd_forward(self, position, step, layer, bottoms):
        grad = self.needs.layer[position] and self._record
        rng = _rng_state(self.device) if grad else None
        leaves, stamps = self._leaves(position, step, bottoms, grad)
        with torch.set_grad_enabled(grad):
            out = layer(*leaves)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        for top, value in zip(step.tops, out):
            self.blobs[top].put(value)
        if grad:
            stamps += [(p, p._version) for p in layer.blobs]
            self._records[position] = _Record(leaves, out, rng, stamps)
        else:
            self._records.pop(position, None)
        return out

    def _leaves(self, position, step, bottoms, grad):
        """The bottoms as autograd leaves (a diff where Caffe computes one), and their stamps.
        A bottom the layer overwrites in place, whose memory Python holds, is copied first so
        that the graph keeps the values the layer read."""
        leaves, stamps = [], []
        tops = set(step.tops)
        for name, tensor, need in zip(step.bottoms, bottoms, self.needs.bottom[position]):
            if name not in tops:  # an in-place bottom is this layer's own top by now
                stamps.append(self.blobs[name].stamp())
            elif grad and self.blobs[name].exposed:
                tensor = tensor.clone()
            leaf = tensor.detach()
            if grad and need and leaf.is_floating_point():
                leaf.requires_grad_(True)
            leaves.append(leaf)
        return leaves, stamps

    # -- backward -------------------------------------------------------------------------
    def backward(self, first: int | None = None, last: int = 0) -> None:
        """Caffe's BackwardFromTo: positions ``first`` (default: the last layer) down to
        ``last``, each from the data and diffs its blobs hold now."""
        first = len(self.steps) - 1 if first is None else first
        with self.net.threads():  # a small net on one thread (Net.thread_policy)
            self._backward_from_to(first, last)

    def _backward_from_to(self, first: int, last: int) -> None:
        written: set[tuple[str, int]] = set()
        for position in range(first, last - 1, -1):
            self._run_hooks("before_backward", position)
            if self._backward[position]:
                for blob in self.param_blobs[position]:
                    blob.sync()
                if self._python[position]:
                    self._python_backward(position)
                else:
                    self._autograd_backward(position, written)
            self._run_hooks("after_backward", position)

    def _python_backward(self, position: int) -> None:
        step = self.steps[position]
        layer = self.net.layers[step.key]
        layer.blob_backward([self.blobs[t] for t in step.tops], list(self.needs.bottom[position]),
                            [self.blobs[b] for b in step.bottoms])  # fmt: skip

    def _autograd_backward(self, position: int, written: set) -> None:
        step = self.steps[position]
        layer = self.net.layers[step.key]
        record = self._current_record(position, step, layer)
        pairs = [(out, self.blobs[top].diff_tensor())
                 for top, out in zip(step.tops, record.outputs) if out.requires_grad]  # fmt: skip
        need = self.needs.bottom[position]
        leaves = [leaf for leaf, n in zip(record.leaves, need) if n and leaf.requires_grad]
        params = [p for p, n in zip(layer.blobs, self.needs.param[position])
                  if n and p.requires_grad]  # fmt: skip
        if not pairs or not (leaves or params):
            return
        for leaf in leaves:
            leaf.grad = None
        outputs = [o for o, _ in pairs]
        grads = [g.to(o.dtype) for o, g in pairs]
        # the parameters' diffs accumulate (autograd's AccumulateGrad, whose hooks a
        # distributed solver listens to), as Caffe's accumulate until ClearParamDiffs
        torch.autograd.backward(outputs, grads, inputs=leaves + params, retain_graph=True)
        for (name, version), leaf, n in zip(self._writers[position], record.leaves, need):
            if not n or not leaf.requires_grad:
                continue
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            if (name, version) in written:  # a second reader of that version: add
                self.blobs[name].set_diff(self.blobs[name].diff_tensor() + grad)
            else:
                written.add((name, version))
                self.blobs[name].set_diff(grad)
            leaf.grad = None

    def _current_record(self, position: int, step, layer) -> _Record:
        """The layer's last forward graph if its blobs and parameters are as it left them;
        else its forward again over the current bottoms (Caffe's backward reads them now)."""
        record = self._records.get(position)
        if record is not None and _same(record.stamps, self._stamps(step, layer)):
            return record
        return self._recompute(position, step, layer, record)

    def _stamps(self, step, layer) -> list:
        tops = set(step.tops)
        now = [self.blobs[b].stamp() for b in step.bottoms if b not in tops]
        return now + [(p, p._version) for p in layer.blobs]

    def _recompute(self, position: int, step, layer, old: _Record | None) -> _Record:
        bottoms = [self.blobs[b].data_tensor() for b in step.bottoms]
        leaves, stamps = self._leaves(position, step, bottoms, True)
        rng = old.rng if old is not None else _rng_state(self.device)
        with _replaying(layer, rng, self.device), torch.enable_grad():
            out = layer(*leaves)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        stamps += [(p, p._version) for p in layer.blobs]
        record = self._records[position] = _Record(leaves, out, rng, stamps)
        return record

    # -- parameters and callbacks -----------------------------------------------------------
    def clear_param_diffs(self) -> None:
        for info in self.net.param_infos:
            if info.param.grad is not None:
                info.param.grad.zero_()

    def _run_hooks(self, kind: str, position: int) -> None:
        for hook in self.hooks[kind]:
            hook(position)

    def follow(self, device: torch.device) -> None:
        """Move the net and every blob to ``device`` (pycaffe's global mode changed)."""
        if device == self.device:
            return
        self.net.to(device)
        for blob in self.blobs.values():
            blob.move_to(device)
        self._records.clear()
        self.device = device


def _same(stamps, now) -> bool:
    """Stamps are (tensor, version, ...): the same tensor object, the same counts."""
    return len(stamps) == len(now) and all(
        a[0] is b[0] and a[1:] == b[1:] for a, b in zip(stamps, now)
    )


def _param_getter(net: Net, key: str, index: int):
    layers = net.layers
    return lambda: layers[key].blobs[index]  # the builder may share it: looked up at each use


def _flatten(lists):
    for items in lists:
        yield from items


def _device_of(net: Net) -> torch.device:
    first = next(iter(net.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replaying(layer, rng, device: torch.device):
    """The layer's forward run again as it ran: its last random state, and its state (a
    BatchNorm's running averages, which a forward in TRAIN moves: buffers and blobs that take
    no gradient) left as it was."""
    state = [*layer.buffers(), *(p for p in layer.parameters() if not p.requires_grad)]
    buffers = [(b, b.detach().clone()) for b in state]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        yield
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
