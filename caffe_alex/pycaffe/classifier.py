"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that classifies images, resized to
``image_dims`` and centre cropped (or cut into pycaffe's 10 oversampled crops, averaged)."""

from __future__ import annotations

import numpy as np

from ..proto.caffe_pb2 import TEST
from . import io
from .net import Net


def configured_transformer(net: Net, mean, input_scale, raw_scale, channel_swap):
    """A Transformer for the net's first input with pycaffe's settings (HWC -> CHW first)."""
    name = net.inputs[0]
    transformer = io.Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):  # fmt: skip
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale,
                                                  channel_swap)  # fmt: skip
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = image_dims if image_dims is not None and len(image_dims) else (
            self.crop_dims)  # fmt: skip

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """(N x classes) outputs for a list of H x W x K images; with ``oversample`` the mean
        over the 4 corner and centre crops and their mirrors."""
        dims = tuple(int(d) for d in self.image_dims)
        resized = np.zeros((len(inputs), *dims, inputs[0].shape[2]), dtype=np.float32)
        for i, image in enumerate(inputs):
            resized[i] = io.resize_image(image, dims)
        if oversample:
            crops = io.oversample(resized, self.crop_dims)
        else:  # pycaffe's centre crop: float centre minus half the crop, truncated
            centre = np.array(dims) / 2.0
            half = np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
            box = (np.tile(centre, (1, 2))[0] + half).astype(int)
            crops = resized[:, box[0] : box[2], box[1] : box[3], :]
        name = self.inputs[0]
        caffe_in = np.zeros(np.array(crops.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for i, crop in enumerate(crops):
            caffe_in[i] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
