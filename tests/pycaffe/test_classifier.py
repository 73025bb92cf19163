"""caffe.Classifier and caffe.Detector (pycaffe/classifier.py, pycaffe/detector.py): adapters
over tools/deploy.py's Classifier, checked against python/classify.py's predict restated with
caffe.io's own functions, and leaving the net's blobs as pycaffe's do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe

NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""  # noqa: E501


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "w.caffemodel"))
    return str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel")


def pycaffe_predict(net, transformer, image_dims, crop_dims, inputs, oversample):
    """python/caffe/classifier.py's predict, step by step, over caffe.io."""
    input_ = np.zeros((len(inputs), image_dims[0], image_dims[1], inputs[0].shape[2]),
                      dtype=np.float32)  # fmt: skip
    for ix, in_ in enumerate(inputs):
        input_[ix] = caffe.io.resize_image(in_, image_dims)
    if oversample:
        input_ = caffe.io.oversample(input_, crop_dims)
    else:
        center = np.array(image_dims) / 2.0
        crop = np.tile(center, (1, 2))[0] + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
        crop = crop.astype(int)
        input_ = input_[:, crop[0] : crop[2], crop[1] : crop[3], :]
    caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
    for ix, in_ in enumerate(input_):
        caffe_in[ix] = transformer.preprocess("data", in_)
    with torch.no_grad():
        out = torch.cat([net.module(data=torch.from_numpy(caffe_in[i : i + 4]))["prob"]
                         for i in range(0, len(caffe_in), 4)]).numpy()  # fmt: skip
    if oversample:
        out = out.reshape((len(out) // 10, 10, -1)).mean(1)
    return out


@pytest.mark.parametrize("oversample", [False, True])
def test_classifier_predicts_as_pycaffe_and_leaves_its_blobs(files, oversample):
    clf = caffe.Classifier(*files, image_dims=(11, 12), mean=np.array([0.1, 0.2, 0.3]),
                           raw_scale=2.0, channel_swap=(2, 1, 0))  # fmt: skip
    rng = np.random.default_rng(0)
    images = [rng.random((15, 13, 3)).astype(np.float32) for _ in range(5)]
    got = clf.predict(images, oversample=oversample)
    want = pycaffe_predict(clf, clf.transformer, (11, 12), clf.crop_dims, images, oversample)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got.shape == (5, 5)
    if not oversample:  # the last batch (image 4, then zeros) is in the net's blobs, as
        np.testing.assert_array_equal(clf.blobs["prob"].data[0], got[4])  # pycaffe leaves it
        assert not clf.blobs["data"].data[1:].any()
    assert isinstance(clf.transformer, caffe.io.Transformer)  # pycaffe's, ValueError and all


def test_detector_windows_are_classified_as_pycaffe(files, tmp_path):
    from PIL import Image

    image = (np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "im.png")
    det = caffe.Detector(*files, raw_scale=255, channel_swap=(2, 1, 0))
    windows = [(0, 0, 10, 12), (5, 4, 19, 23)]
    found = det.detect_windows([(str(tmp_path / "im.png"), windows)])
    loaded = caffe.io.load_image(str(tmp_path / "im.png"))
    for detection, window in zip(found, windows):
        crop = caffe.io.resize_image(loaded[window[0] : window[2], window[1] : window[3]], (8, 8))
        with torch.no_grad():
            x = torch.from_numpy(det.transformer.preprocess("data", crop)[None])
            want = det.module(data=x.repeat(4, 1, 1, 1))["prob"][0].numpy()
        np.testing.assert_allclose(detection["prediction"], want, rtol=1e-5, atol=1e-7)
