"""The checks of one layer's declaration against its registered class and the net built so far,
in the builder's order: blob counts, the *_param fields it honours, propagate_down, loss
weights, its bottoms and its tops. ``fail(message)`` makes the error located at the layer."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from ..errors import CaffeAlexError
from ..proto import caffe_pb2

Fail = Callable[[str], CaffeAlexError]
LayerParameter = caffe_pb2.LayerParameter

# Fields of a *_param message that mean "which implementation", not "what": always accepted.
_IMPLEMENTATION_FIELDS = frozenset({"engine"})


def check_counts(lp: LayerParameter, cls, fail: Fail) -> None:
    for what, names, (low, high) in (
        ("bottom", lp.bottom, cls.bottoms),
        ("top", lp.top, cls.tops),
    ):
        n = len(names)
        if n < low or (high is not None and n > high):
            want = f"{low}" if low == high else f"{low} to {high}" if high else f"at least {low}"
            raise fail(f"takes {want} {what} blob(s), got {n}")


def check_fields(lp: LayerParameter, cls, fail: Fail) -> None:
    for field_desc, value in lp.ListFields():
        allowed = cls.params.get(field_desc.name, None)
        if field_desc.name not in cls.params or allowed is None:
            continue
        for sub_desc, _ in value.ListFields():
            if sub_desc.name not in allowed and sub_desc.name not in _IMPLEMENTATION_FIELDS:
                raise fail(f"{field_desc.name}.{sub_desc.name} is not supported by this layer")


def detach_flags(lp: LayerParameter, fail: Fail) -> list[bool]:
    """Per bottom, whether it gets no gradient (Caffe's propagate_down: false)."""
    if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
        raise fail(
            f"propagate_down must be given once per bottom or not at all "
            f"({len(lp.propagate_down)} for {len(lp.bottom)} bottoms)"
        )
    return [not propagate for propagate in lp.propagate_down] or [False] * len(lp.bottom)


def loss_weights(
    lp: LayerParameter, cls, anonymous: Collection[str], fail: Fail
) -> list[tuple[int, float]]:
    """(top index, weight) of each top with a nonzero loss weight."""
    weights = list(lp.loss_weight)
    tops = len(lp.top) - len(anonymous)
    if not weights and cls.is_loss:
        if tops > 1:  # Caffe's default is one weight, for top 0: not enough here
            raise fail(
                f"a loss layer with {tops} tops needs loss_weight once per "
                "top (e.g. loss_weight: 1 loss_weight: 0)"
            )
        weights = [1.0] * len(lp.top)
    if weights and len(weights) != len(lp.top):
        raise fail(
            f"loss_weight must be given once per top or not at all ({len(weights)} for {tops} tops)"
        )
    return [(i, w) for i, w in enumerate(weights) if w != 0]


def check_bottoms(
    lp: LayerParameter, known: Collection[str], anonymous: Collection[str], fail: Fail
) -> None:
    for index, bottom in enumerate(lp.bottom):
        if bottom not in known or bottom in anonymous:
            raise fail(f"unknown bottom blob '{bottom}' (bottom index {index})")


def check_tops(
    lp: LayerParameter,
    known: Collection[str],
    producers: Mapping[str, str],
    anonymous: Collection[str],
    fail: Fail,
) -> None:
    # Caffe's AppendTop: a top may name an existing blob only in place (as the bottom at
    # the same index); any other repeat, earlier in the net or among this layer's own
    # tops, is a second producer.
    named_here: set[str] = set()
    for index, top in enumerate(lp.top):
        if top in anonymous or (index < len(lp.bottom) and lp.bottom[index] == top):
            continue
        if top in named_here:
            raise fail(
                f"top blob '{top}' produced by multiple sources (named twice among this "
                "layer's tops)"
            )
        if top in known:
            raise fail(
                f"top blob '{top}' produced by multiple sources "
                f"(already by layer '{producers[top]}')"
            )
        named_here.add(top)
