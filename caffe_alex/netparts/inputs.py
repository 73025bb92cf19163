"""A net's inputs: the shapes declared for them, and the tensors a forward call gives them."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch

from ..errors import CaffeAlexError
from ..registry import Shape


def input_dims(name: str, shape) -> Shape:
    """A declared input shape as ints; anything else (1.5, "3") is refused, not truncated."""
    try:
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        given = list(shape) if isinstance(shape, (list, tuple)) else type(shape).__name__
        raise CaffeAlexError(
            f"the shape given for input '{name}' must be a sequence of integers, got {given}"
        ) from None


def bind_inputs(
    input_names: Sequence[str], args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The net's inputs by name from a forward call's positional and keyword tensors."""
    if len(args) > len(input_names):
        raise CaffeAlexError(
            f"net takes {len(input_names)} inputs {input_names}, got {len(args)} positional"
        )
    blobs = dict(zip(input_names, args))
    for name, value in kwargs.items():
        if name not in input_names:
            raise CaffeAlexError(f"'{name}' is not an input of the net; inputs: {input_names}")
        blobs[name] = value
    missing = [n for n in input_names if n not in blobs]
    if missing:
        raise CaffeAlexError(f"missing net input(s) {missing}; inputs: {input_names}")
    return blobs
