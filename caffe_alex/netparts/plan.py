"""The records of a built net's plan: its learnable blobs and its layers as wired."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ParamInfo:
    """One learnable blob as the solver sees it (Caffe's learnable_params_ entry)."""

    layer: str
    index: int
    param: nn.Parameter
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    share_name: str = ""
    owner: tuple[str, int] | None = None  # (layer, index) this blob is shared from
    given: set[str] = field(default_factory=set)  # which multipliers the prototxt set


@dataclass
class LayerStep:
    """One layer of the forward loop, as wired: the blobs it reads and writes, which bottoms
    get no gradient (propagate_down), and the loss weight of each top that has one."""

    layer: str
    key: str
    bottoms: list[str]
    tops: list[str]
    detach: list[bool]
    loss_weights: list[tuple[int, float]] = field(default_factory=list)
    overwritten: set[int] = field(default_factory=set)  # tops a later layer overwrites in place
