"""caffe.draw: caffe_alex/pycaffe/draw.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import draw as _module

sys.modules[__name__] = _module
