"""Generated protobuf classes for proto/caffe.proto (regenerate with scripts/gen_proto.sh)."""

from . import caffe_pb2

__all__ = ["caffe_pb2"]
