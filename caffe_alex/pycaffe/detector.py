"""pycaffe's ``caffe.Detector``: R-CNN-style windowed detection, each window cropped (with
``context_pad`` pixels of context, padded with the mean where it leaves the image), warped to
the net input and classified."""

from __future__ import annotations

import os

import numpy as np

from ..errors import CaffeAlexError
from ..proto.caffe_pb2 import TEST
from ..tools.deploy import configured_transformer
from . import io
from .net import Net


class Detector(Net):
    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):  # fmt: skip
        super().__init__(model_file, TEST, weights=pretrained_file)
        name = self.inputs[0]
        self.transformer = configured_transformer(io.Transformer, name, self.blobs[name].shape,
                                                  mean, input_scale, raw_scale,
                                                  channel_swap)  # fmt: skip
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows) -> list[dict]:
        """[{"window", "prediction", "filename"}] for (image file, windows) pairs; a window is
        (ymin, xmin, ymax, xmax)."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for filename, windows in images_windows:
            image = io.load_image(filename).astype(np.float32)
            crops += [self.crop(image, np.asarray(window)) for window in windows]
        name = self.inputs[0]
        caffe_in = np.zeros((len(crops), crops[0].shape[2], *self.blobs[name].data.shape[2:]),
                            dtype=np.float32)  # fmt: skip
        for i, crop in enumerate(crops):
            caffe_in[i] = self.transformer.preprocess(name, crop)
        predictions = iter(self.forward_all(**{name: caffe_in})[self.outputs[0]])
        return [{"window": window, "prediction": next(predictions), "filename": filename}
                for filename, windows in images_windows for window in windows]  # fmt: skip

    def detect_selective_search(self, image_fnames) -> list[dict]:
        """Windows from Selective Search (the selective_search_ijcv_with_python package, as
        pycaffe), then detect_windows."""
        try:
            import selective_search_ijcv_with_python as selective_search  # optional, external
        except ImportError:
            raise CaffeAlexError(
                "detect_selective_search needs selective_search_ijcv_with_python (and MATLAB), "
                "as pycaffe does; give windows to detect_windows instead"
            ) from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im, window) -> np.ndarray:
        """The window of ``im`` (H x W x K), with context as configure_crop set it. pycaffe's
        arithmetic; its float slice bounds are truncated to int here (NumPy refuses floats)."""
        window = np.asarray(window)
        crop = im[int(window[0]) : int(window[2]), int(window[1]) : int(window[3])]
        if not self.context_pad:
            return crop
        size = self.blobs[self.inputs[0]].width  # pycaffe assumes a square input
        scale = size / (1.0 * size - self.context_pad * 2)
        half_h, half_w = (window[2] - window[0] + 1) / 2.0, (window[3] - window[1] + 1) / 2.0
        centre = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(centre, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h, scale_w = size / (box[2] - box[0] + 1), size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)  # rows of the crop outside the image
        pad_x = round(max(0, -box[1]) * scale_w)
        height, width = im.shape[:2]
        box = np.clip(box, 0.0, [height, width, height, width])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise CaffeAlexError(
                f"window {window.tolist()} lies outside the {height}x{width} image"
            )
        crop_h = min(round(clip_h * scale_h), size - pad_y)
        crop_w = min(round(clip_w * scale_w), size - pad_x)
        context = im[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])]
        context = io.resize_image(context, (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y : pad_y + crop_h, pad_x : pad_x + crop_w] = context
        return crop

    def configure_crop(self, context_pad) -> None:
        """Crop dimensions from the net input; with context, the mean image to pad with (in
        the image's own layout, channel order and scale)."""
        name = self.inputs[0]
        order = self.transformer.transpose[name]
        inverse = [order[t] for t in order]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(inverse)
        swap = self.transformer.channel_swap.get(name)
        if swap is not None:
            crop_mean = crop_mean[:, :, [list(swap).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(name)
        self.crop_mean = crop_mean / raw_scale if raw_scale is not None else crop_mean
