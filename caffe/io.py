"""caffe.io: caffe_alex/pycaffe/io.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import io as _module

sys.modules[__name__] = _module
