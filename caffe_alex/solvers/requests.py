"""The requests a solver honours between iterations, Caffe's SolverAction: "stop" or
"snapshot", asked at any time (from a signal handler too: asking only sets an attribute) and
taken at the next check. With several ranks any rank's request is every rank's (the ranks
agree them, coordination.py); a snapshot asked while rank 0 tests waits for the test's end,
when every rank can join it."""

from __future__ import annotations

ACTIONS = ("stop", "snapshot", "none")


class Requests:
    """``early_exit``: a stop was taken (Caffe's requested_early_exit_)."""

    def __init__(self):
        self.pending: str | None = None
        self.early_exit = False
        self.deferred_snapshot = False

    def ask(self, action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown solver action {action!r}")
        self.pending = None if action == "none" else action

    def take(self) -> str | None:
        action, self.pending = self.pending, None
        return action

    def after_iteration(self, ranks) -> tuple[bool, bool]:
        """(snapshot, stop) asked for by a signal, on this rank or (with a world) on any."""
        action = self.take()
        return ranks.agree(action == "snapshot", action == "stop")

    def during_test(self, ranks, snapshot) -> bool:
        """Asked before each test batch: a snapshot is taken now (``snapshot()``), or with
        several ranks after the test; True: stop testing."""
        while (action := self.take()) is not None:
            if action == "snapshot" and ranks.size > 1:
                self.deferred_snapshot = True  # the other ranks join it after the test
            elif action == "snapshot":
                snapshot()
            elif action == "stop":
                self.early_exit = True
        return self.early_exit

    def after_test(self, ranks, snapshot) -> None:
        """Rank 0 has tested while the others waited here: share what was asked meanwhile (a
        snapshot asked during the test is taken now, when every rank can join it)."""
        action = self.take()
        snap = action == "snapshot" or self.deferred_snapshot
        snap, stop = ranks.agree(snap, action == "stop" or self.early_exit)
        self.deferred_snapshot = False
        if snap:
            snapshot()
        self.early_exit = stop
