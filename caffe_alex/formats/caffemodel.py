"""Caffe's binary formats: ``.caffemodel`` (a NetParameter with blobs: current, V1 and V0
records) and ``.binaryproto`` (one BlobProto, e.g. a mean image), read and written.

Blobs go through the hand-walked wire format of wire.py; only the small non-blob parts of
each layer go through caffe_pb2.
"""

from __future__ import annotations

import os

import numpy as np
from google.protobuf import message as pb_message

from ..errors import CaffeAlexError
from ..log import get_logger
from ..proto import caffe_pb2
from .atomic import atomic_path
from .upgrade import upgrade_net
from .weightset import LayerWeights, WeightSet, note_doubles, shown, text_of
from .wire import (
    WireError,
    blob_pieces,
    encode_varint,
    fields,
    float_field,
    key,
    length_delimited,
    map_file,
    parse_blob,
)

log = get_logger()


# ---- reading blobs and layers --------------------------------------------------------------

def _strip_blobs(buf, start: int, end: int, blob_field: int, v0_field: int | None):
    """A layer message without its blobs (bytes) and the blobs. In a V1 record, the nested V0
    layer (``v0_field``) holds the blobs instead (V0LayerParameter.blobs is field 50)."""
    rest, blobs = bytearray(), []
    for number, wire, s, e, fs in fields(buf, start, end):
        if number == blob_field and wire == 2:
            blobs.append(parse_blob(buf, s, e))
        elif number == v0_field and wire == 2:
            inner, inner_blobs = _strip_blobs(buf, s, e, 50, None)
            rest += length_delimited(number, inner)
            blobs.extend(inner_blobs)
        else:
            rest += buf[fs:e]
    return bytes(rest), blobs


_NET_FIELDS = {f.number: f for f in caffe_pb2.NetParameter.DESCRIPTOR.fields}
_DELIMITED_TYPES = {9, 11, 12}  # string, message, bytes: always wire type 2
_LAYER, _V1_LAYERS = 100, 2


def _parse_layer(buf, s: int, e: int, number: int):
    if number == _LAYER:
        rest, blobs = _strip_blobs(buf, s, e, 7, None)
        cls = caffe_pb2.LayerParameter
    else:
        rest, blobs = _strip_blobs(buf, s, e, 6, 1)
        cls = caffe_pb2.V1LayerParameter
    try:
        cls.FromString(rest)
    except pb_message.DecodeError:
        # A fork's parameter at a number that means another message here (DeepLab's
        # interp_param at BVLC's input_param, ...): keep the fields every fork shares.
        rest = _shared_fields(rest, cls, _SHARED[number], s)
    return rest, blobs


# The fields of a layer record every fork agrees on: name, type, bottom, top (LayerParameter
# 1-4; V1LayerParameter: bottom 2, top 3, name 4, type 5, and the nested V0 layer 1).
_SHARED = {_LAYER: {1, 2, 3, 4}, _V1_LAYERS: {1, 2, 3, 4, 5}}


def _shared_fields(record: bytes, cls, keep: set[int], pos: int) -> bytes:
    kept = b"".join(
        record[fs:e] for n, _, _, e, fs in fields(record, 0, len(record)) if n in keep
    )
    try:
        cls.FromString(kept)
    except pb_message.DecodeError:
        raise WireError(f"not a {cls.DESCRIPTOR.name}", pos) from None
    return kept


def _parse_net(buf, size: int):
    """(NetParameter without blobs, blobs of each layer record in file order)."""
    rest, records = bytearray(), []
    for number, wire, s, e, fs in fields(buf, 0, size):
        if number not in _NET_FIELDS:
            raise WireError(f"unknown field {number}", fs)
        if _NET_FIELDS[number].type in _DELIMITED_TYPES and wire != 2:
            raise WireError(f"field {number} ({_NET_FIELDS[number].name}) of wire type {wire}", fs)
        if number in (_LAYER, _V1_LAYERS) and wire == 2:
            layer_rest, blobs = _parse_layer(buf, s, e, number)
            rest += length_delimited(number, layer_rest)
            records.append(blobs)
        else:
            rest += buf[fs:e]
    try:
        net = caffe_pb2.NetParameter.FromString(bytes(rest))
    except pb_message.DecodeError:
        raise WireError("failed to parse", 0) from None
    return net, records


def _version(net: caffe_pb2.NetParameter) -> str:
    if any(v1.HasField("layer") for v1 in net.layers):
        return "V0"
    return "V1" if len(net.layers) else "current"


def read_caffemodel(path) -> WeightSet:
    """Read a binary NetParameter with blobs, upgrading V0/V1 records as Caffe does."""
    path = os.fspath(path)
    buf, size = map_file(path)
    try:
        raw, records = _parse_net(buf, size)
    except WireError as exc:
        raise CaffeAlexError(
            f"{path}: not a caffemodel (NetParameter): {exc.reason} at byte {exc.pos}"
        ) from None
    if not records:
        raise CaffeAlexError(f"{path}: not a caffemodel: the NetParameter has no layers")
    version = _version(raw)
    if len(raw.layers) and _escape_strings(raw):
        log.warning("%s: bytes that are not UTF-8 in the legacy layers' text fields are read "
                    "as \\xNN escapes", path)  # fmt: skip
    names = [(v1.layer.name if v1.HasField("layer") else v1.name) for v1 in raw.layers]
    names += [lp.name for lp in raw.layer]  # Caffe refuses files with both; upgrade says so
    net = upgrade_net(raw, path)
    layers, j = [], 0
    for lp in net.layer:  # the upgrade keeps the order; it drops V0 padding layers (no blobs)
        # and may add an input layer first (none): match records by name going forward
        k = next((i for i in range(j, len(names)) if names[i] == lp.name), None)
        blobs = [] if k is None else records[k]
        j = j if k is None else k + 1
        layers.append(LayerWeights(text_of(lp.name), text_of(lp.type), list(blobs), lp))
    note_doubles(path, layers)
    return WeightSet(layers, path, "caffemodel", version, text_of(net.name))


def _escape_strings(message) -> bool:
    """Replace the text fields that are not UTF-8 (Python's protobuf gives them as bytes) by
    their \\xNN-escaped form, in place; whether any was. The legacy upgrade needs str fields;
    current-format records keep their bytes instead (see text_of)."""
    changed = False
    for fd, value in message.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            for item in value if fd.is_repeated else [value]:
                changed |= _escape_strings(item)
        elif fd.type == fd.TYPE_STRING and fd.is_repeated:
            for i, item in enumerate(value):
                if isinstance(item, bytes):
                    value[i] = shown(text_of(item))
                    changed = True
        elif fd.type == fd.TYPE_STRING and isinstance(value, bytes):
            setattr(message, fd.name, shown(text_of(value)))
            changed = True
    return changed


# ---- writing a caffemodel ------------------------------------------------------------------


def _layer_pieces(lp: caffe_pb2.LayerParameter, blobs) -> list:
    """A LayerParameter with blobs, blobs (field 7) placed in field order as C++ writes."""
    bare = caffe_pb2.LayerParameter()
    bare.CopyFrom(lp)
    bare.ClearField("blobs")
    data = bare.SerializeToString()
    split = next((fs for n, _, _, _, fs in fields(data, 0, len(data)) if n > 7), len(data))
    pieces = [data[:split]]
    for blob_data, diff in blobs:
        pieces += blob_pieces(blob_data, diff)
    pieces.append(data[split:])
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    return [key(_LAYER, 2) + encode_varint(size)] + pieces


def write_caffemodel(path, net_name: str, layers) -> None:
    """Write ``layers`` — (LayerParameter, [(data, diff or None), ...]) pairs — as a binary
    NetParameter (Net::ToProto's layout), streaming blob data from the arrays."""
    # the name as bytes: one read from a caffemodel may hold bytes that are not UTF-8 (text_of)
    head = length_delimited(1, net_name.encode("utf-8", "surrogateescape")) if net_name else b""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for lp, blobs in layers:
            for piece in _layer_pieces(lp, blobs):
                f.write(piece)


def weightset_layers(ws: WeightSet):
    """A WeightSet as write_caffemodel's (LayerParameter, blobs) pairs."""
    if not ws.has_definitions():
        raise CaffeAlexError(
            f"{ws.path}: this {ws.format} file has no layer definitions; "
            "give the net definition (--model) to write a caffemodel"
        )
    for lw in ws.layers:
        blobs = [(b.data.reshape(b.shape), b.diff) for b in lw.blobs if b is not None]
        yield lw.param, blobs


def net_layer_params(net) -> list[caffe_pb2.LayerParameter]:
    """The net's layer definitions as Caffe's Net keeps them: no blobs, phase set."""
    out = []
    for lp in net.net_param.layer:
        copy = caffe_pb2.LayerParameter()
        copy.CopyFrom(lp)
        copy.ClearField("blobs")
        if not copy.HasField("phase"):  # Net::Init gives each layer the net's phase
            copy.phase = caffe_pb2.Phase.Value(net.phase)
        out.append(copy)
    return out


# ---- .binaryproto mean files ----------------------------------------------------------------


def read_binaryproto(path) -> np.ndarray:
    """A BlobProto file (e.g. a mean image) as a float32 array of its stored shape."""
    path = os.fspath(path)
    buf, size = map_file(path)
    try:
        blob = parse_blob(buf, 0, size)
    except WireError as exc:
        raise CaffeAlexError(
            f"{path}: not a BlobProto file: {exc.reason} at byte {exc.pos}"
        ) from None
    if size == 0 or blob.data.size == 0:
        raise CaffeAlexError(f"{path}: not a BlobProto file: it holds no data")
    return np.array(blob.data, dtype=np.float32).reshape(blob.shape)


def write_binaryproto(path, array) -> None:
    """As caffe.io.array_to_blobproto: a 4-D array uses num/channels/height/width (what older
    readers expect), any other rank the ``shape`` field."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        log.info("%s: converting %s data to float32", path, array.dtype)
    head, tail = b"", b""  # fields go in number order: num..width (1-4), data (5), shape (7)
    if array.ndim == 4:
        legacy = caffe_pb2.BlobProto()
        legacy.num, legacy.channels, legacy.height, legacy.width = array.shape
        head = legacy.SerializeToString()
    else:
        tail = length_delimited(7, caffe_pb2.BlobShape(dim=array.shape).SerializeToString())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in [head, *float_field(5, array), tail]:
            f.write(piece)
