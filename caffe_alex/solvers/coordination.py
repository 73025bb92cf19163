"""What a solver does with the other ranks, as an object the training loop calls whether there
are other ranks or not: ``Alone`` (one process: nothing to share) or ``Ranked`` (one rank of a
distributed.World, Caffe's multi-GPU semantics: rank 0's parameters and feed seed at the start,
the gradients summed over the ranks before the update, requests agreed, snapshots gathered on
rank 0, a restored state sent from rank 0)."""

from __future__ import annotations

import contextlib

from . import distributed


class Alone:
    """A solver that is the only process."""

    rank, size, is_root = 0, 1, True

    def together(self):
        return contextlib.nullcontext()

    def start(self, params, feed_seed: int, train_feed, layer_wise: bool) -> int:
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


class Ranked:
    """A solver that is one rank of ``world``."""

    def __init__(self, world: distributed.World):
        self.world = world
        self.rank, self.size, self.is_root = world.rank, world.size, world.rank == 0
        self._reducer = None

    def together(self):
        """A block that fails on every rank when it fails on one (distributed.together)."""
        return distributed.together(self.world)

    def start(self, params, feed_seed: int, train_feed, layer_wise: bool) -> int:
        """Rank 0's parameters and feed seed for all; the gradient reducer. Returns the seed."""
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


def coordination(world: distributed.World | None) -> Alone | Ranked:
    return Alone() if world is None else Ranked(world)
