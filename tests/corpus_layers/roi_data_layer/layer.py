"""Stand-in for py-faster-rcnn's roi_data_layer.layer: one image, its im_info and ground-truth
boxes, at the top shapes the real layer declares in setup (scale 600, max size 1000)."""

import numpy as np
import yaml

import caffe


class RoIDataLayer(caffe.Layer):
    def setup(self, bottom, top):
        self._num_classes = yaml.safe_load(self.param_str_)["num_classes"]
        top[0].reshape(1, 3, 600, 1000)
        top[1].reshape(1, 3)
        top[2].reshape(1, 4)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        top[0].reshape(1, 3, 600, 1000)
        top[0].data[...] = 0
        top[1].reshape(1, 3)
        top[1].data[...] = np.array([[600, 1000, 1.0]], dtype=np.float32)
        top[2].reshape(1, 5)  # x1, y1, x2, y2, class
        top[2].data[...] = np.array([[10, 10, 200, 300, 1]], dtype=np.float32)
