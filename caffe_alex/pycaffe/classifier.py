"""pycaffe's ``caffe.Classifier``: a TEST-phase ``caffe.Net`` that classifies images, resized
to ``image_dims`` and centre cropped (or cut into pycaffe's 10 oversampled crops, averaged).

An adapter: the preprocessing, the crops and the batching are tools/deploy.py's Classifier (the
one ``caffe-alex deploy`` runs), whose batches go through this net's own blobs, so that after
``predict`` they hold the last batch, as pycaffe's do."""

from __future__ import annotations

import numpy as np
import torch

from ..proto.caffe_pb2 import TEST
from ..tools import deploy
from . import io, runtime
from .net import Net


class _ThroughBlobs(deploy.Classifier):
    """tools/deploy.py's Classifier running its chunks through a caffe.Net, padded to the
    net's batch with zeros as pycaffe's forward_all pads them."""

    def __init__(self, net: Net, **options):
        self.pycaffe_net = net
        super().__init__(net.module, device=runtime.device(), transformer=io.Transformer,
                         **options)  # fmt: skip

    def run(self, chunk: np.ndarray, names) -> list[np.ndarray]:
        net = self.pycaffe_net
        batch = np.zeros(net.blobs[self.input].shape, np.float32)
        batch[: len(chunk)] = chunk
        with torch.inference_mode(False):  # the blobs stay usable by a backward
            net.forward(**{self.input: batch})
        return [net.blobs[n].data[: len(chunk)].copy() for n in names]


class Classifier(Net):
    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):  # fmt: skip
        super().__init__(model_file, TEST, weights=pretrained_file)
        self._classifier = _ThroughBlobs(self, image_dims=image_dims, mean=mean,
                                         input_scale=input_scale, raw_scale=raw_scale,
                                         channel_swap=channel_swap)  # fmt: skip
        self.transformer = self._classifier.transformer
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = image_dims if image_dims is not None and len(image_dims) else (
            self.crop_dims)  # fmt: skip

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """(N x classes) outputs for a list of H x W x K images; with ``oversample`` the mean
        over the 4 corner and centre crops and their mirrors (flattened per image, as
        pycaffe's); without, the output blob's own shape per image."""
        self._classifier.image_dims = tuple(int(d) for d in self.image_dims)
        out = self._classifier.predict(inputs, oversample)
        if oversample:
            return out
        return out.reshape(len(out), *self.blobs[self.outputs[0]].shape[1:])
