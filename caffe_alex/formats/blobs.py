"""Caffe's BlobProto message <-> numpy arrays (embedded blobs, mean images)."""

from __future__ import annotations

import numpy as np

from ..errors import CaffeAlexError, describe
from ..proto import caffe_pb2


def read_blob_proto(path: str, what: str = "mean_file") -> caffe_pb2.BlobProto:
    """A small BlobProto file (a mean image) parsed whole; ``what`` names it in errors."""
    try:
        with open(path, "rb") as f:
            return caffe_pb2.BlobProto.FromString(f.read())
    except OSError as exc:
        raise CaffeAlexError(f"cannot read {what} '{path}': {describe(exc)}") from None
    except Exception as exc:  # protobuf's DecodeError
        raise CaffeAlexError(f"{what} '{path}' is not a BlobProto: {describe(exc)}") from None


def blob_proto_to_array(proto: caffe_pb2.BlobProto) -> np.ndarray:
    """A BlobProto as float32, shaped by `shape` or the legacy num/channels/height/width."""
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    else:
        shape = (proto.num, proto.channels, proto.height, proto.width)
    data = proto.double_data if len(proto.double_data) else proto.data
    return np.asarray(data, dtype=np.float32).reshape(shape)


def array_to_blob_proto(array) -> caffe_pb2.BlobProto:
    proto = caffe_pb2.BlobProto()
    array = np.asarray(array, dtype=np.float32)
    proto.shape.dim.extend(array.shape)
    proto.data.extend(array.ravel().tolist())
    return proto
