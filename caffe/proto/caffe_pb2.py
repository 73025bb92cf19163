"""caffe.proto.caffe_pb2: caffe-alex's generated module of BVLC Caffe's schema (the same
module object as caffe_alex.proto.caffe_pb2, so messages pass between the two freely)."""

import sys

from caffe_alex.proto import caffe_pb2 as _module

sys.modules[__name__] = _module
