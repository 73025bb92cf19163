"""caffe.classifier: caffe_alex/pycaffe/classifier.py under pycaffe's name
(the same module object)."""

import sys

from caffe_alex.pycaffe import classifier as _module

sys.modules[__name__] = _module
