"""caffe.coord_map: caffe_alex/pycaffe/coord_map.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import coord_map as _module

sys.modules[__name__] = _module
