"""The protobuf wire format, walked by hand for the big messages: a caffemodel's or a solver
state's blobs. The generated classes would hold every float as a Python-level repeated field
(slow, several copies, and the C++ runtime's 64 MB limit in older protobufs); here blob data is
a zero-copy numpy view of the memory-mapped file, and written straight from the arrays."""

from __future__ import annotations

import mmap
import os

import numpy as np
from google.protobuf import message as pb_message

from ..errors import reading
from ..proto import caffe_pb2
from .file_errors import regular_file
from .weightset import Blob

# ---- the protobuf wire format --------------------------------------------------------------


class WireError(Exception):
    def __init__(self, reason: str, pos: int):
        super().__init__(reason)
        self.reason, self.pos = reason, pos


def varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError("truncated varint", start)
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("malformed varint", start)


def fields(buf, start: int, end: int):
    """Yield (field number, wire type, value start, value end, field start) of a message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0", field_start)
        if wire == 0:
            _, value_end = varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise WireError(f"invalid wire type {wire}", field_start)
        if value_end > end:
            raise WireError(
                f"field {number} truncated ({value_end - pos} bytes declared, {end - pos} remain)",
                field_start,
            )
        yield number, wire, pos, value_end, field_start
        pos = value_end


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, 2) + encode_varint(len(payload)) + payload

_FLOAT_FIELDS = {5: ("data", "<f4"), 6: ("diff", "<f4"), 8: ("double_data", "<f8")}
_FLOAT_FIELDS[9] = ("double_diff", "<f8")


def _floats(buf, wire: int, s: int, e: int, dtype: str):
    size = np.dtype(dtype).itemsize
    if wire == 2:  # packed, as Caffe writes it: a zero-copy view of the file
        if (e - s) % size:
            raise WireError(f"packed {dtype[1:]} data of {e - s} bytes", s)
        return np.frombuffer(buf, dtype=dtype, count=(e - s) // size, offset=s)
    if wire == (5 if size == 4 else 1):  # unpacked: one element per field (legal, rare)
        return np.frombuffer(buf, dtype=dtype, count=1, offset=s)
    raise WireError(f"wire type {wire} for a float field", s)


# NVIDIA/caffe stores fp16 (and other) weights as BlobProto raw_data (12) typed by
# raw_data_type (10), values of its Type enum: DOUBLE 0, FLOAT 1, FLOAT16 2 (INT 3, UINT 4 hold
# no weights). Neither number is used by BVLC or another fork's BlobProto.
_RAW_TYPE, _RAW_DATA = 10, 12
_RAW_DTYPES = {0: "<f8", 1: "<f4", 2: "<f2"}


def _raw_data(buf, raw_type: int | None, raw: tuple[int, int] | None, pos: int) -> np.ndarray:
    if raw is None:
        return np.zeros(0, np.float32)
    if raw_type not in _RAW_DTYPES:
        what = "no raw_data_type" if raw_type is None else f"raw_data_type {raw_type}"
        raise WireError(f"raw_data with {what} (NVIDIA/caffe's DOUBLE, FLOAT or FLOAT16)", pos)
    dtype = np.dtype(_RAW_DTYPES[raw_type])
    s, e = raw
    if (e - s) % dtype.itemsize:
        raise WireError(f"raw_data of {e - s} bytes is not whole {dtype.name} values", s)
    return np.frombuffer(buf, dtype=dtype, count=(e - s) // dtype.itemsize, offset=s)


def parse_blob(buf, start: int, end: int) -> Blob:
    parts: dict[str, list[np.ndarray]] = {}
    rest = bytearray()
    raw_type = raw = None
    for number, wire, s, e, fs in fields(buf, start, end):
        if number in _FLOAT_FIELDS:
            name, dtype = _FLOAT_FIELDS[number]
            parts.setdefault(name, []).append(_floats(buf, wire, s, e, dtype))
        elif number == _RAW_TYPE and wire == 0:
            raw_type = varint(buf, s, e)[0]
        elif number == _RAW_DATA and wire == 2:
            raw = (s, e)
        else:
            rest += buf[fs:e]
    try:
        proto = caffe_pb2.BlobProto.FromString(bytes(rest))
    except pb_message.DecodeError:
        raise WireError("not a BlobProto", start) from None
    legacy = any(proto.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = (
        (proto.num, proto.channels, proto.height, proto.width) if legacy else tuple(proto.shape.dim)
    )
    count = blob_count(shape, start)
    doubles = _join(parts.get("double_data"))
    data = doubles if doubles.size else _join(parts.get("data"))  # as Blob::FromProto picks
    if not data.size:
        data = _raw_data(buf, raw_type, raw, start).astype(np.float32)
    double_diff = _join(parts.get("double_diff"))
    diff = double_diff if double_diff.size else _join(parts.get("diff"))
    if data.size != count:
        raise WireError(f"blob of shape {list(shape)} holds {data.size} values", start)
    if diff.size and diff.size != count:
        raise WireError(f"blob of shape {list(shape)} holds {diff.size} diff values", start)
    return Blob(data, tuple(int(d) for d in shape), legacy, diff if diff.size else None)


MAX_AXES = 32  # Caffe's kMaxBlobAxes
INT_MAX = 2**31 - 1  # Caffe's limit on a blob's count and on each dimension


def blob_count(shape, pos: int = 0) -> int:
    """The count of a blob of ``shape``, with Caffe's Blob::Reshape checks: at most 32 axes, no
    negative dimension, a count within INT_MAX."""
    if len(shape) > MAX_AXES:
        raise WireError(f"blob of {len(shape)} axes (at most {MAX_AXES})", pos)
    count = 1
    for d in shape:
        if d < 0 or d > INT_MAX:
            raise WireError(f"blob of shape {list(shape)}: dimension {d} out of range", pos)
        count *= d
    if count > INT_MAX:
        raise WireError(f"blob of shape {list(shape)} exceeds {INT_MAX} values", pos)
    return count


def _join(arrays: list[np.ndarray] | None) -> np.ndarray:
    if not arrays:
        return np.zeros(0, np.float32)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

def map_file(path: str):
    with reading(path), open(regular_file(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b"", 0
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size

def float_field(number: int, array: np.ndarray) -> list:
    if array.size == 0:  # an empty packed field is not written at all
        return []
    raw = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    return [key(number, 2) + encode_varint(raw.nbytes), memoryview(raw).cast("B")]


def blob_pieces(data: np.ndarray, diff: np.ndarray | None) -> list:
    """BlobProto as Caffe's Blob<float>::ToProto writes it: data (5), diff (6), shape (7)."""
    shape = caffe_pb2.BlobShape(dim=data.shape).SerializeToString()
    pieces = float_field(5, data)
    if diff is not None:
        pieces += float_field(6, diff)
    pieces.append(length_delimited(7, shape))
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    return [key(7, 2) + encode_varint(size)] + pieces
