"""Caffe's prefetch ring for worker processes: batch buffers in shared memory, made once and
reused, which workers fill and the feeding process reads.

A ``Layout`` names the arrays of one batch (per data layer: the uint8 crops, their draws, the
labels; or float32 arrays). ``Ring(layout, depth)`` holds ``depth`` such batches, each one block
of shared memory with numpy views over it; a batch never crosses freshly allocated memory (whose
page faults cost more than the copy itself on small machines). ``WorkerPool`` runs worker
processes that take (batch number, slot) tasks, fill the slot with ``fill(views, batch)`` and
report it; ``take(b)`` waits for batch b (batches may finish out of order), and ``give_back()``
hands its slot to the next task, so at most ``depth`` batches are being made or waiting. What
``fill`` returns (small values of no fixed size, such as a batch's box rows) comes back with the
report, as ``extra`` of the batch taken.

Workers ignore SIGINT and SIGHUP (the feeding process decides what a signal means, as in
``caffe train``), leave when the feeding process is gone, and report errors, which ``take``
raises; a worker that dies (killed, out of memory) is an error naming it, not a hang.
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import signal
import traceback
from collections import deque

import numpy as np
import torch
import torch.multiprocessing as mp

from ..errors import CaffeAlexError

_ALIGN = 64  # each array starts on a cache line
_POLL_S = 1.0  # how often a waiting process checks that the other side is alive


class Layout:
    """The arrays of one batch: key -> (dtype, shape), each at its byte offset in a block."""

    def __init__(self, arrays: dict):
        self.arrays = {k: (np.dtype(d), tuple(s)) for k, (d, s) in arrays.items()}
        self.offsets, size = {}, 0
        for key, (dtype, shape) in self.arrays.items():
            self.offsets[key] = size
            size += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        self.nbytes = max(size, _ALIGN)

    def views(self, block: torch.Tensor) -> dict[str, np.ndarray]:
        raw = block.numpy()
        out = {}
        for key, (dtype, shape) in self.arrays.items():
            start = self.offsets[key]
            out[key] = raw[start : start + math.prod(shape) * dtype.itemsize].view(dtype)
            out[key] = out[key].reshape(shape)
        return out


class Ring:
    """``depth`` batch buffers laid out by ``layout``: shared memory for worker processes, or
    private memory for the feeding process alone (``shared=False``)."""

    def __init__(self, layout: Layout, depth: int, shared: bool = True):
        self.blocks = [torch.empty(layout.nbytes, dtype=torch.uint8) for _ in range(depth)]
        if shared:
            self.blocks = [b.share_memory_() for b in self.blocks]
        self.views = [layout.views(b) for b in self.blocks]

    def __len__(self):
        return len(self.blocks)


def _context():
    # fork, as torch's DataLoader does on Linux: workers inherit the sources (open databases
    # reopen themselves) and the ring; elsewhere spawn pickles them.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0])


class WorkerPool:
    """``workers`` processes filling a Ring of ``depth`` slots with ``fill(views, b)``, batch
    numbers from ``start`` on."""

    def __init__(self, fill, layout: Layout, workers: int, depth: int, start: int):
        ctx = _context()
        self.ring = Ring(layout, max(depth, 1))
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.stop = ctx.Event()  # set by close: queued tasks are dropped, not made
        parent = os.getpid()
        self.processes = [
            ctx.Process(
                target=_work,
                args=(fill, self.ring, self.tasks, self.results, self.stop, parent),
                name=f"caffe-alex data worker {k}",
                daemon=True,
            )
            for k in range(workers)
        ]
        for process in self.processes:
            process.start()
        self.free = deque(range(len(self.ring)))
        self.next_task, self.expected = start, start
        self.done: dict[int, tuple] = {}  # batch -> (slot, error, extra)
        self.held = None
        self.extra = None  # what fill returned for the batch last taken
        self._hand_out()

    def _hand_out(self) -> None:
        while self.free:
            self.tasks.put((self.next_task, self.free.popleft()))
            self.next_task += 1

    def take(self, b: int) -> dict[str, np.ndarray]:
        """The views of batch ``b`` (the next one) once a worker has filled them."""
        if b != self.expected or self.held is not None:
            raise RuntimeError(f"batch {b} taken out of turn (expected {self.expected})")
        while b not in self.done:
            try:
                number, slot, error, extra = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            self.done[number] = slot, error, extra  # an error waits for its batch's turn
        slot, error, self.extra = self.done.pop(b)
        if error is not None:
            raise error
        self.held = slot
        return self.ring.views[slot]

    def give_back(self) -> None:
        """The batch last taken is read: its slot can take the next task."""
        if self.held is not None:
            self.free.append(self.held)
            self.held = None
            self.expected += 1
            self._hand_out()

    def _check_alive(self) -> None:
        for k, process in enumerate(self.processes):
            if not process.is_alive():
                code = process.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self.close()
                raise CaffeAlexError(
                    f"data worker {k} (pid {process.pid}) died ({how}; killed, or out of "
                    "memory?); run with workers=0 to read in this process"
                )

    def close(self) -> None:
        if self.stop.is_set():  # closed already
            return
        processes, self.processes = self.processes, []
        self.stop.set()
        for _ in processes:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):  # the queue is already closed
                break
        for process in processes:
            process.join(timeout=2)
            if process.is_alive():
                process.terminate()
                process.join(timeout=2)
        for q in (self.tasks, self.results):
            q.cancel_join_thread()  # never block on a queue nobody reads any more
            q.close()

    def __del__(self):
        if getattr(self, "processes", None):
            try:
                self.close()
            except Exception:  # at interpreter exit the queues may be gone already
                pass


def _work(fill, ring: Ring, tasks, results, stop, parent: int) -> None:
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    torch.set_num_threads(1)  # one core per worker: the workers share the machine
    # (OpenCV's thread count is left alone: cv2.setNumThreads in a forked child whose parent
    # already ran OpenCV's thread pool hangs; OpenCV re-creates its pool after a fork itself)
    while True:
        try:
            task = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the feeding process is gone
                return
            continue
        if task is None or stop.is_set():
            return
        number, slot = task
        try:
            extra = fill(ring.views[slot], number)
            results.put((number, slot, None, extra))
        except Exception as exc:  # reported to the feeding process, which raises it
            results.put((number, slot, _pack(exc), None))


def _pack(exc: Exception):
    """The exception itself where it pickles (CaffeAlexErrors do), else its traceback."""
    if isinstance(exc, CaffeAlexError):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:  # an argument that does not pickle
            return CaffeAlexError(str(exc))
    return RuntimeError(f"in a data worker:\n{traceback.format_exc()}")
