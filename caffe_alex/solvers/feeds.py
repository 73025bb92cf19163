"""Batches for the solver's nets, counted so that a snapshot can record where each feed is.

By default each net with data layers gets caffe_alex.data.loader.make_feed (train: the solver's
seed; test net i: seed + 1 + i); ``feeds`` may instead give, per net, any iterator of
{input name: tensor} dicts: a dict {"train": it, "test": [it, ...]} or a callable
``feeds(net, index)`` (index None for the train net, i for test net i). On resume a feed with
``load_state`` (DataFeed) gets its saved state, one with ``skip(n)`` skips, any other is read
forward to the saved count.
"""

from __future__ import annotations

import torch

from ..data.loader import make_feed
from ..errors import CaffeAlexError
from ..log import get_logger

log = get_logger()


class SolverFeeds:
    """The feeds of a solver's nets by key: "train", or a test net's index. ``given``: the
    solver's ``feeds`` argument (None: make_feed); ``seed``: the train feed's seed (settable
    until its first batch: the ranks agree on rank 0's); ``options`` go to make_feed; with
    several ``ranks`` the train feed deals the records round robin."""

    def __init__(self, train_net, test_nets, given, seed: int, options: dict, ranks, device):
        self.seed, self._options, self.ranks, self._device = seed, options, ranks, device
        self._nets = {"train": train_net, **dict(enumerate(test_nets))}
        self._feeds = {
            key: TrackedFeed(self._maker(net, key, given), net,
                             "train" if key == "train" else f"test #{key}")
            for key, net in self._nets.items()
        }  # fmt: skip

    def __getitem__(self, key) -> TrackedFeed:
        return self._feeds[key]

    def _maker(self, net, key, given):
        index = None if key == "train" else key

        def make():
            if given is None:
                return self._default(net, index, None), True
            if callable(given):
                return iter(given(net, index)), False
            return iter(given["train"] if index is None else given["test"][index]), False

        return make

    def _default(self, net, index, seed):
        if seed is None:
            seed = self.seed + (0 if index is None else 1 + index)
        options = dict(self._options)
        if self.ranks.size > 1 and index is None:  # the test nets run on rank 0 alone
            options.update(rank=self.ranks.rank, world_size=self.ranks.size)
        return make_feed(net, seed=seed, device=self._device, **options)

    def remaker(self, key):
        """A function making the default feed of ``key`` anew from a seed (to resume one)."""
        index = None if key == "train" else key
        return lambda seed: self._default(self._nets[key], index, seed)

    def close(self) -> None:
        for feed in self._feeds.values():
            feed.close()


class TrackedFeed:
    def __init__(self, make, net, name: str):
        self._make, self.net, self.name = make, net, name
        self.feed = None
        self.batches = 0  # batches handed out since the start of training
        self.owned = False  # made here by make_feed (so it may be remade with another seed)

    def _open(self):
        if self.feed is None:
            self.feed, self.owned = self._make()
            _check_inputs(self.net, self.feed, self.name)
        return self.feed

    def open(self) -> None:
        """Make the feed now (it is otherwise made at the first batch): a bad source fails here."""
        self._open()

    def discard(self) -> None:
        """Forget the feed before its first batch (to be made again, e.g. with another seed)."""
        if self.batches:
            raise CaffeAlexError(f"the {self.name} feed has already handed out batches")
        self.close()
        self.feed = None

    def __next__(self) -> dict:
        feed = self._open()
        if self.owned:  # make_feed's DataFeed draws from numpy generators of its own
            batch = next(feed)
        else:
            # a DataLoader given by hand draws its base seed from torch's global RNG whenever
            # it (re)starts: keep that draw away from the RNG that dropout uses, or a resumed
            # run would drift
            with torch.random.fork_rng(devices=[]):
                batch = next(feed)
        self.batches += 1
        return batch

    def take(self, count: int) -> dict | None:
        """The next ``count`` batches stacked (DataFeed.take) where the feed made here gives
        them that way; else None, nothing taken."""
        feed = self._open()
        take = getattr(feed, "take", None) if self.owned else None
        taken = take(count) if take is not None else None
        if taken is not None:
            self.batches += count
        return taken

    def takes_at_most(self) -> int:
        """How many batches ``take`` gives at once at most (0: it never does)."""
        feed = self._open()
        return getattr(feed, "takes_at_most", 0) if self.owned else 0

    def where(self, item: int) -> str | None:
        """The record behind item ``item`` of the last batch (None for a feed given by hand)."""
        where = getattr(self.feed, "where", None)
        return where(item) if where is not None else None

    def state(self) -> dict:
        inner = self._open()
        saved = inner.state() if hasattr(inner, "state") else None
        return {"batches": self.batches, "state": saved}

    def load_state(self, saved: dict, remake=None) -> None:
        inner = self._open()
        state, target = saved.get("state"), int(saved["batches"])
        if state is not None and hasattr(inner, "load_state"):
            reseed = state.get("seed") != getattr(inner, "seed", None)
            if self.owned and remake is not None and reseed:  # a random seed: use the saved one
                self.feed = inner = remake(state["seed"])
            inner.load_state(state)
        else:
            self.skip_to(target)
        self.batches = target

    def skip_to(self, target: int) -> None:
        inner = self._open()
        if hasattr(inner, "skip"):
            inner.skip(target - self.batches)
        elif target >= self.batches:
            for _ in range(target - self.batches):
                next(inner)
        else:
            raise CaffeAlexError(f"the {self.name} feed cannot go back to batch {target}")
        self.batches = target

    def close(self) -> None:
        if self.feed is not None and hasattr(self.feed, "close"):
            self.feed.close()


def _check_inputs(net, feed, name: str) -> None:
    tops = getattr(feed, "tops", None)
    if tops is None:
        return
    missing = [n for n in net.input_names if n not in tops]
    if missing:
        raise CaffeAlexError(
            f"the {name} net has input(s) {missing} that no data layer feeds (Input layers); "
            "training needs data layers (Data, ImageData, HDF5Data, MemoryData) or feeds given "
            "to the Solver"
        )


def name_the_record(exc: CaffeAlexError, feed) -> None:
    """Add to an error about one item of a batch (``exc.item``: a bad label) the record that
    item came from, which only the feed knows."""
    where = getattr(feed, "where", None)
    place = where(exc.item) if where is not None and exc.item is not None else None
    if place:
        exc.message = f"{exc.message} ({place})"
        exc.args = (exc.message,)
