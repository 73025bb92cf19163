"""Caffe's InsertSplits: the net definition as Caffe's Net runs it, with a Split layer after every
top that more than one layer reads (a top with a nonzero loss_weight counts as one more reader).

caffe-alex's own builder needs no Split (autograd sums the gradients of a blob read twice); the
pycaffe layer builds from this form so that layer and blob names, their order and the layers of
a saved .caffemodel are those pycaffe users see in Caffe (``conv1_relu1_0_split`` ...).
"""

from __future__ import annotations

from collections import defaultdict

from ..proto import caffe_pb2


def split_layer_name(layer: str, blob: str, index: int) -> str:
    return f"{blob}_{layer}_{index}_split"


def split_blob_name(layer: str, blob: str, index: int, split: int) -> str:
    return f"{blob}_{layer}_{index}_split_{split}"


def _readers(net: caffe_pb2.NetParameter):
    """Which (layer, top) each bottom reads, how many readers each top has, and the loss
    weights given in the definition, keyed by (layer index, top index)."""
    last_writer: dict[str, tuple[int, int]] = {}
    source: dict[tuple[int, int], tuple[int, int]] = {}
    readers: dict[tuple[int, int], int] = defaultdict(int)
    loss: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(net.layer):
        for j, blob in enumerate(layer.bottom):
            if blob in last_writer:  # an unknown bottom is the builder's error to report
                source[(i, j)] = last_writer[blob]
                readers[last_writer[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_writer[blob] = (i, j)
        for j, weight in enumerate(layer.loss_weight[: len(layer.top)]):
            top = last_writer[layer.top[j]]
            loss[top] = weight
            if weight:  # a loss is one more use of the blob
                readers[top] += 1
    return source, readers, loss


def insert_splits(net: caffe_pb2.NetParameter) -> tuple[caffe_pb2.NetParameter, list[int]]:
    """A copy of ``net`` with Caffe's Split layers inserted (``net`` is not changed), and for
    each of its layers the position in ``net`` of the layer it copies or, for a Split, of the
    layer whose top it splits."""
    source, readers, loss = _readers(net)
    split = caffe_pb2.NetParameter()
    split.CopyFrom(net)
    del split.layer[:]
    positions: list[int] = []
    next_split: dict[tuple[int, int], int] = defaultdict(int)
    for i, original in enumerate(net.layer):
        positions.append(i)
        layer = split.layer.add()
        layer.CopyFrom(original)
        for j, blob in enumerate(layer.bottom):
            top = source.get((i, j))
            if top is not None and readers[top] > 1:
                writer = net.layer[top[0]].name
                layer.bottom[j] = split_blob_name(writer, blob, top[1], next_split[top])
                next_split[top] += 1
        for j, blob in enumerate(layer.top):
            count = readers[(i, j)]
            if count <= 1:
                continue
            weight = loss.get((i, j), 0.0)
            _add_split(split, layer.name, blob, j, count, weight)
            positions.append(i)
            if weight:  # the Split's first top carries the loss instead
                layer.ClearField("loss_weight")
                next_split[(i, j)] += 1
    return split, positions


def _add_split(net, layer: str, blob: str, index: int, count: int, weight: float) -> None:
    split = net.layer.add(name=split_layer_name(layer, blob, index), type="Split", bottom=[blob])
    split.top.extend(split_blob_name(layer, blob, index, k) for k in range(count))
    if weight:
        split.loss_weight.extend([weight] + [0.0] * (count - 1))
