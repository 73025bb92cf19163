"""What a solver does with the other ranks, as an object the training loop calls whether there
are other ranks or not: ``Alone`` (one process: nothing to share), ``Ranked`` (one rank of a
distributed.World, Caffe's multi-GPU semantics: rank 0's parameters and feed seed at the start,
the gradients summed over the ranks before the update, requests agreed, snapshots gathered on
rank 0, a restored state sent from rank 0) or ``Waiting`` (rank r of n, built before its world
exists, as pycaffe's scripts build a solver before its NCCL: Solver.join makes it Ranked)."""

from __future__ import annotations

import contextlib

from ..errors import CaffeAlexError
from . import distributed


class Alone:
    """A solver that is the only process."""

    rank, size, is_root = 0, 1, True
    reads_alone = True  # restore: this process reads the snapshot files itself

    def together(self):
        return contextlib.nullcontext()

    def start(self, params, feed_seed: int, train_feed, layer_wise: bool, broadcast=True) -> int:
        return feed_seed

    def arm(self, final: bool) -> None:
        pass

    def finish_gradients(self) -> None:
        pass

    def agree(self, snap: bool, stop: bool) -> tuple[bool, bool]:
        return snap, stop

    def gather(self, make_mine) -> list | None:
        return None

    def share(self, tensors, obj):
        return obj

    def close(self) -> None:
        pass


class Waiting(Alone):
    """Rank ``rank`` of ``size`` whose world is not joined yet: it seeds, deals its records
    and builds (or not) its test nets as that rank, and shares nothing until Solver.join."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.is_root = rank, size, rank == 0


class Ranked:
    """A solver that is one rank of ``world``."""

    reads_alone = False  # restore: rank 0 reads and sends

    def __init__(self, world: distributed.World):
        self.world = world
        self.rank, self.size, self.is_root = world.rank, world.size, world.rank == 0
        self._reducer = None

    def together(self):
        """A block that fails on every rank when it fails on one (distributed.together)."""
        return distributed.together(self.world)

    def start(self, params, feed_seed: int, train_feed, layer_wise: bool, broadcast=True) -> int:
        """Rank 0's parameters (unless not ``broadcast``) and feed seed for all; the gradient
        reducer. Returns the seed."""
        if broadcast:
            self.world.broadcast_tensors(params)
        # one dealing of the records for all ranks, even when the seed is drawn at random
        shared = self.world.broadcast_object(feed_seed)
        if shared != feed_seed:
            train_feed.discard()
        self._reducer = distributed.GradientReducer(self.world, params, layer_wise)
        return shared

    def arm(self, final: bool) -> None:
        """Whether the coming backward pass is the last of the iteration (its gradients are
        summed over the ranks as they are ready)."""
        self._reducer.armed = final

    def finish_gradients(self) -> None:
        self._reducer.finish()

    def agree(self, snap: bool, stop: bool) -> tuple[bool, bool]:
        """Any rank asking makes every rank snapshot or stop."""
        return tuple(self.world.agree(snap, stop))

    def gather(self, make_mine) -> list | None:
        """Each rank's ``make_mine()`` on rank 0 (by rank); None on the others."""
        return self.world.gather(make_mine())

    def share(self, tensors, obj):
        """Rank 0's ``tensors`` (in place) and ``obj`` on every rank."""
        self.world.broadcast_tensors(tensors)
        return self.world.broadcast_object(obj)

    def close(self) -> None:
        if self._reducer is not None:
            self._reducer.close()


def join_world(solver, world: distributed.World) -> None:
    """Solver.join: ``solver``, built as Waiting(rank, size), becomes that rank of ``world``
    (or an error): the ranks agree on its train feed's seed and sum its gradients."""
    if (world.rank, world.size) != (solver.rank, solver.ranks.size):
        raise CaffeAlexError(
            f"this solver was built as rank {solver.rank} of {solver.ranks.size}; it cannot "
            f"join as rank {world.rank} of {world.size}"
        )
    solver.world, solver.ranks = world, Ranked(world)
    solver.feeds.ranks = solver.ranks
    params = [info.param for info in solver.learnable]
    train, layer_wise = solver.feeds["train"], solver.param.layer_wise_reduce
    solver.feeds.seed = solver.ranks.start(params, solver.feeds.seed, train, layer_wise, False)


def coordination(world) -> Alone | Ranked:
    """For a solver's ``world``: None (one process), a distributed.World, or Waiting."""
    if world is None:
        return Alone()
    return world if isinstance(world, Waiting) else Ranked(world)
