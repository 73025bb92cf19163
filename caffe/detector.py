"""caffe.detector: caffe_alex/pycaffe/detector.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import detector as _module

sys.modules[__name__] = _module
