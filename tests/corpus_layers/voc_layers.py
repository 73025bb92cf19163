"""Stand-in for FCN's voc_layers: a segmentation data layer (one image and its label map)."""

import caffe


class SBDDSegDataLayer(caffe.Layer):
    def setup(self, bottom, top):
        if len(top) != 2 or bottom:
            raise Exception("tops: data and label; no bottom")

    def reshape(self, bottom, top):
        top[0].reshape(1, 3, 224, 224)
        top[1].reshape(1, 1, 224, 224)

    def forward(self, bottom, top):
        top[0].data[...] = 0
        top[1].data[...] = 0


VOCSegDataLayer = SBDDSegDataLayer
