"""Stand-in for py-faster-rcnn's rpn.proposal_target_layer: sampled rois, their labels and
per-class box targets and weights, with the shapes the real layer declares."""

import yaml

import caffe


class ProposalTargetLayer(caffe.Layer):
    def setup(self, bottom, top):
        self._classes = yaml.safe_load(self.param_str_)["num_classes"]
        self.reshape(bottom, top)

    def reshape(self, bottom, top):
        top[0].reshape(1, 5)
        top[1].reshape(1, 1)
        for blob in top[2:5]:
            blob.reshape(1, self._classes * 4)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[:1]
        top[1].data[...] = 0
        for blob in top[2:5]:
            blob.data[...] = 0
