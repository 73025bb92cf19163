"""Stand-in for py-faster-rcnn's rpn.anchor_target_layer: RPN labels and box targets with the
shapes of the real layer (A = 9 anchors per cell of the score map)."""

import yaml

import caffe


class AnchorTargetLayer(caffe.Layer):
    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str_)
        self._a = 3 * len(params.get("scales", (8, 16, 32)))
        self.reshape(bottom, top)

    def reshape(self, bottom, top):
        height, width = bottom[0].data.shape[-2:]
        top[0].reshape(1, 1, self._a * height, width)
        for blob in top[1:4]:
            blob.reshape(1, self._a * 4, height, width)

    def forward(self, bottom, top):
        top[0].data[...] = -1  # every anchor ignored
        for blob in top[1:4]:
            blob.data[...] = 0
