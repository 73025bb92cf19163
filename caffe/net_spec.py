"""caffe.net_spec: caffe_alex/pycaffe/net_spec.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import net_spec as _module

sys.modules[__name__] = _module
