"""pycaffe's ``forward_all`` and ``forward_backward_all``: a Net run over inputs of any length,
in batches of its own batch size (the last one padded with zeros), the outputs concatenated and
the padding cut off again."""

from __future__ import annotations

import numpy as np


def forward_all(net, blobs, inputs: dict) -> dict[str, np.ndarray]:
    collected = {name: [] for name in set(net.outputs + list(blobs or []))}
    for batch in _batches(net, inputs):
        for name, value in net.forward(blobs=blobs, **batch).items():
            collected[name].extend(value.copy())
    result = {name: np.asarray(values) for name, values in collected.items()}
    return _unpad(result, inputs)


def forward_backward_all(net, blobs, diffs, arrays: dict):
    """``arrays``: inputs and output diffs by name."""
    outs = {name: [] for name in set(net.outputs + list(blobs or []))}
    grads = {name: [] for name in set(net.inputs + list(diffs or []))}
    forward = list(_batches(net, {n: arrays[n] for n in net.inputs if n in arrays}))
    backward = list(_batches(net, {n: arrays[n] for n in net.outputs if n in arrays}))
    for i in range(max(len(forward), len(backward))):
        got = net.forward(blobs=blobs, **(forward[i] if i < len(forward) else {}))
        back = net.backward(diffs=diffs, **(backward[i] if i < len(backward) else {}))
        for name, value in got.items():
            outs[name].extend(value.copy())
        for name, value in back.items():
            grads[name].extend(value.copy())
    outs = {name: np.asarray(values) for name, values in outs.items()}
    grads = {name: np.asarray(values) for name, values in grads.items()}
    return _unpad(outs, arrays), _unpad(grads, arrays)


def _batches(net, arrays: dict[str, np.ndarray]):
    """Split arrays into the net's batch size; the last batch padded with zeros."""
    count = len(next(iter(arrays.values())))
    size = next(iter(net.blobs.values())).shape[0]
    for begin in range(0, count - count % size, size):
        yield {name: value[begin : begin + size] for name, value in arrays.items()}
    remainder = count % size
    if remainder:
        yield {
            name: np.concatenate([value[-remainder:],
                                  np.zeros((size - remainder, *value.shape[1:]))])
            for name, value in arrays.items()
        }  # fmt: skip


def _unpad(result: dict, given: dict) -> dict:
    if not result or not given:
        return result
    pad = len(next(iter(result.values()))) - len(next(iter(given.values())))
    return {name: value[:-pad] for name, value in result.items()} if pad > 0 else result
