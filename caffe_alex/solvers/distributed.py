"""Training on several processes, as Caffe trains on several GPUs (parallel.cpp), on
torch.distributed.

Every process (rank) runs its own Solver on its own device, as Caffe runs one solver per GPU:

- the ranks come from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or from ``launch``, which starts one process per
  listed GPU with the same variables (``caffe-alex train --gpu 0,1``); NCCL joins GPUs, gloo CPUs;
- rank 0's parameters are broadcast at the start (Caffe's NCCL::Broadcast);
- after an iteration's forward/backward passes the gradients are summed over the ranks and
  multiplied by 1/ranks before the update (NCCL::on_gradients_ready): parameter by parameter
  while the last backward pass runs when the solver's ``layer_wise_reduce`` is true (Caffe's
  default), else in one flat buffer afterwards (GradientReducer);
- stop/snapshot requests are agreed every iteration, so a signal to any rank reaches them all;
- a failure while starting is exchanged (``together``), so a rank that cannot start makes every
  rank stop with its message; collectives give up after ``timeout`` seconds, so the ranks left
  when one dies stop with an error instead of waiting for ever.

The gradients are reduced here rather than by DistributedDataParallel because Caffe's order
matters: the sum over ranks comes after all ``iter_size`` passes and before the update's
clipping, 1/iter_size normalisation and regularisation (update.py), which then see the same
numbers as one process running ``iter_size`` x ranks passes.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import CaffeAlexError
from ..log import get_logger

log = get_logger()

DEFAULT_TIMEOUT = 1800.0  # seconds; torch's own default for gloo, and longer than a test pass
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: global rank of ``size``, local rank of ``local_size``."""

    rank: int
    size: int
    local_rank: int
    local_size: int


def ranks_from_env(environ=None) -> Ranks | None:
    """The ranks torchrun (or ``launch``) gave this process; None for a single process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    if "RANK" not in env:
        raise CaffeAlexError("WORLD_SIZE is set but RANK is not: start the ranks with torchrun")
    try:
        size = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise CaffeAlexError(
            "the torchrun variables are not integers: "
            + ", ".join(f"{k}={env.get(k)!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        ) from None
    if size <= 1:
        return None
    if not (0 <= rank < size and 0 <= local_rank < local_size):
        raise CaffeAlexError(
            f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={size} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}"
        )
    return Ranks(rank, size, local_rank, local_size)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class World:
    """This process's rank among the training processes, and the collectives the solver uses.

    ``World.start(ranks, device)`` joins the process group (NCCL for a CUDA device, gloo
    otherwise, or ``backend``) with ``timeout`` seconds for every collective; small messages
    (requests, errors, feed positions) go through a gloo group on the CPU, so agreeing on them
    never waits for a GPU's queue.
    """

    def __init__(self, ranks: Ranks, device, *, backend: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, init_method: str | None = None):  # fmt: skip
        self.init_method = init_method  # None: torchrun's variables (MASTER_ADDR, MASTER_PORT)
        self.rank, self.size = ranks.rank, ranks.size
        self.local_rank, self.local_size = ranks.local_rank, ranks.local_size
        self.device = torch.device(device)
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.timeout = float(timeout)
        self._control = None

    @classmethod
    def start(cls, ranks: Ranks, device, *, backend=None, timeout=DEFAULT_TIMEOUT,
              init_method=None) -> World:  # fmt: skip
        world = cls(ranks, device, backend=backend, timeout=timeout, init_method=init_method)
        world._join()
        return world

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _join(self) -> None:
        if not self.timeout > 0:
            raise CaffeAlexError(f"--dist-timeout must be > 0 seconds (got {self.timeout:g})")
        if self.backend == "nccl" and self.device.type != "cuda":
            raise CaffeAlexError("the nccl backend needs CUDA devices; use gloo for the CPU")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = timedelta(seconds=self.timeout)
        extra = {"device_id": self.device} if self.backend == "nccl" else {}
        if self.init_method:
            extra["init_method"] = self.init_method
        where = self.init_method or "MASTER_ADDR, MASTER_PORT"
        with self._failing(f"joining the other ranks ({where})"):
            dist.init_process_group(self.backend, timeout=timeout, rank=self.rank,
                                    world_size=self.size, **extra)  # fmt: skip
            self._control = (dist.new_group(backend="gloo", timeout=timeout)
                             if self.backend != "gloo" else dist.group.WORLD)  # fmt: skip

    def close(self) -> None:
        """Leave the process group. Our references to it go too: a group that outlives
        destroy_process_group is torn down while the interpreter exits, which can abort."""
        self._control = None
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def _failing(self, what: str):
        """Collectives raise RuntimeError (or ValueError for a bad rendezvous): one line."""
        try:
            yield
        except (RuntimeError, ValueError) as exc:
            raise CaffeAlexError(
                f"rank {self.rank}: {what} failed: another rank stopped or did not answer within "
                f"{self.timeout:g} s (--dist-timeout): {_one_line(exc)[:300]}"
            ) from None

    # -- small messages, on the CPU -------------------------------------------------------
    def all_gather(self, obj) -> list:
        out = [None] * self.size
        with self._failing("exchanging state with the other ranks"):
            dist.all_gather_object(out, obj, group=self._control)
        return out

    def gather(self, obj) -> list | None:
        """``obj`` of every rank, on rank 0 (None elsewhere)."""
        out = [None] * self.size if self.is_root else None
        with self._failing("gathering the ranks' state"):
            dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self._failing("receiving rank 0's state"):
            dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag, true on every rank when it is true on any."""
        tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        with self._failing("agreeing on stop/snapshot requests"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control)
        return [bool(v) for v in tensor.tolist()]

    def check_same(self, values: dict) -> None:
        """Every rank must have been started alike: compare ``{what: digest}`` with rank 0's."""
        everyone = self.all_gather(values)
        for rank, theirs in enumerate(everyone):
            for what in values:
                if theirs.get(what) != everyone[0].get(what):
                    raise CaffeAlexError(
                        f"the ranks disagree on {what}: rank {rank}'s differs from rank 0's; "
                        "start every rank with the same solver file and options"
                    )

    # -- tensors, on the training device ---------------------------------------------------
    def broadcast_tensors(self, tensors) -> None:
        """Overwrite ``tensors`` (same dtype and device) with rank 0's values."""
        tensors = [t for t in tensors if t.numel()]
        if not tensors:
            return
        with torch.no_grad():
            flat = _flatten_dense_tensors([t.detach() for t in tensors])
            with self._failing("receiving rank 0's parameters"):
                dist.broadcast(flat, src=0)
            for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                tensor.copy_(value)


@contextlib.contextmanager
def together(world: World | None):
    """Run a block on every rank; when it fails on one, fail on all: the failing rank raises its
    own error, the others one naming it. Without a world, the block just runs."""
    if world is None:
        yield
        return
    failure = None
    try:
        yield
    except Exception as exc:  # any failure: passed on to the other ranks, then re-raised
        failure = exc
    messages = world.all_gather(None if failure is None else _one_line(failure))
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message is not None:
            raise CaffeAlexError(f"rank {rank} could not start: {message}")


# ---- per-rank random state, for snapshots ------------------------------------------------


def _to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _from_text(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), np.uint8).copy())


def rng_state(device: torch.device) -> dict:
    """This rank's torch (and CUDA) generator state, as text for the snapshot's JSON."""
    state = {"torch_rng": _to_text(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda_rng"] = _to_text(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(_from_text(state["torch_rng"]))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(_from_text(state["cuda_rng"]), device)


# ---- gradients ---------------------------------------------------------------------------


class GradientReducer:
    """Sums the gradients over the ranks and multiplies them by 1/ranks (in float32, as Caffe's
    caffe_gpu_scal by 1/solver_count).

    ``layer_wise``: each parameter's sum starts as soon as the last backward pass has produced
    its gradient (post-accumulate-grad hooks, while the earlier layers still compute), in a
    fixed order that is the same on every rank; otherwise one flat sum after the passes.
    Set ``armed`` during the pass whose gradients are final, then call ``finish()``.
    """

    def __init__(self, world: World, params, layer_wise: bool = True):
        self.world = world
        # the order backward finishes them (last layer first); collectives must match in order
        self.params = [p for p in reversed(list(params)) if p.requires_grad]
        self.layer_wise = layer_wise
        self.scale = float(np.float32(1) / np.float32(world.size))
        self.armed = False
        self._ready = [False] * len(self.params)
        self._next = 0
        self._works: list = []
        self._hooks = []
        if layer_wise:
            for index, param in enumerate(self.params):
                hook = functools.partial(self._on_ready, index)
                self._hooks.append(param.register_post_accumulate_grad_hook(hook))

    def _on_ready(self, index: int, param) -> None:
        if not self.armed:
            return
        self._ready[index] = True
        while self._next < len(self.params) and self._ready[self._next]:
            self._launch(self._next)

    def _launch(self, index: int) -> None:
        param = self.params[index]
        if param.grad is None:  # unused in this pass: Caffe's diff is zero
            param.grad = torch.zeros_like(param)
        with self.world._failing("summing the gradients"):
            self._works.append(dist.all_reduce(param.grad, async_op=True))
        self._next = index + 1

    def finish(self) -> None:
        """Complete the sums and scale; the gradients are then the same on every rank."""
        if not self.params:
            return
        if self.layer_wise:
            while self._next < len(self.params):
                self._launch(self._next)
            grads = [p.grad for p in self.params]
            with self.world._failing("summing the gradients"):
                for work in self._works:
                    work.wait()
            torch._foreach_mul_(grads, self.scale)
        else:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.params]
            flat = _flatten_dense_tensors(grads)
            with self.world._failing("summing the gradients"):
                dist.all_reduce(flat)
            flat.mul_(self.scale)
            for grad, value in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(value)
        self.armed, self._next, self._works = False, 0, []
        self._ready = [False] * len(self.params)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._works = [], []


# ---- starting the processes --------------------------------------------------------------


def _child(index: int, nprocs: int, port: int, fn, args) -> None:
    # torchrun's variables; the rendezvous store is the launcher's, as torchrun's agent hosts
    # it (TORCHELASTIC_USE_AGENT_STORE), so no rank owns it and no port is guessed
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")  # fmt: skip
    fn(*args)


def launch(fn, args=(), nprocs: int = 2, *, grace: float = 30.0, names=None,
           timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``fn(*args)`` in ``nprocs`` new processes, rank i of nprocs on this machine (torchrun's
    variables set), and wait for them. SIGINT and SIGHUP sent to this process are passed on to
    every rank. When a rank fails, the others get ``grace`` seconds to stop by themselves (they
    notice through the collectives) before they are terminated; then CaffeAlexError names it.
    ``names``: how to call each rank in messages (e.g. "GPU 1"); ``timeout``: how long the
    ranks may take to meet."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout),
                          wait_for_workers=False)  # fmt: skip
    context = torch.multiprocessing.start_processes(
        _child, args=(nprocs, store.port, fn, tuple(args)), nprocs=nprocs, join=False,
        start_method="spawn",
    )  # fmt: skip
    processes = context.processes

    def forward(signum, frame):
        for process in processes:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    saved = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        failed = _wait(processes, grace)
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
    try:
        if failed is not None:
            _print_traceback(context.error_files[failed[0]])
            raise CaffeAlexError(_failure(*failed, names))
    finally:
        for path in context.error_files:
            with contextlib.suppress(OSError):
                os.remove(path)


def _wait(processes, grace: float) -> tuple[int, int] | None:
    """Wait for every process; returns (index, exit code) of the first that failed, if any."""
    pending = dict(enumerate(processes))
    failed, deadline = None, None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        multiprocessing.connection.wait([p.sentinel for p in pending.values()], timeout)
        for index, process in list(pending.items()):
            if process.exitcode is None:
                continue
            del pending[index]
            if process.exitcode != 0 and failed is None:
                failed, deadline = (index, process.exitcode), time.monotonic() + grace
        if pending and deadline is not None and time.monotonic() >= deadline:
            for process in pending.values():
                process.terminate()
            for process in pending.values():
                process.join(5)
                if process.exitcode is None:
                    process.kill()
                    process.join()
            pending = {}
    return failed


def _failure(index: int, code: int, names) -> str:
    name = f"rank {index}" + (f" ({names[index]})" if names else "")
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"stopped with exit code {code}"
    return f"{name} {how}; training stopped on every rank"


def _print_traceback(path: str) -> None:
    """A rank that failed with an unexpected exception left its traceback in ``path``."""
    with contextlib.suppress(OSError, EOFError, pickle.UnpicklingError):
        with open(path, "rb") as f:
            sys.stderr.write(pickle.load(f))
