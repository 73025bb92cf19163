"""tools/pycaffe_io.py's resize_image as the pycaffe a user installs today: with scikit-image
(the pycaffe extra) it is python/caffe/io.py's resize_image, scikit-image's resize on the image
stretched to [0, 1] (anti-aliased when shrinking, since scikit-image 0.15), scipy's zoom for
other channel counts; without it, the NumPy order-1 resize of scikit-image <= 0.14 (the
references of tests/tools/test_deploy.py), with a note in the log."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from caffe_alex.tools import pycaffe_io
from caffe_alex.tools.pycaffe_io import resize_behaviour, resize_image

skimage_transform = pytest.importorskip("skimage.transform", reason="the pycaffe extra")
ndimage = pytest.importorskip("scipy.ndimage")


def pycaffe_resize(im, new_dims, interp_order=1):
    """python/caffe/io.py's resize_image (BVLC master), restated."""
    if im.shape[-1] == 1 or im.shape[-1] == 3:
        im_min, im_max = im.min(), im.max()
        if im_max > im_min:
            im_std = (im - im_min) / (im_max - im_min)
            resized_std = skimage_transform.resize(im_std, new_dims, order=interp_order,
                                                   mode="constant")  # fmt: skip
            resized_im = resized_std * (im_max - im_min) + im_min
        else:
            ret = np.empty((new_dims[0], new_dims[1], im.shape[-1]), dtype=np.float32)
            ret.fill(im_min)
            return ret
    else:
        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized_im = ndimage.zoom(im, scale + (1,), order=interp_order)
    return resized_im.astype(np.float32)


@pytest.mark.parametrize(
    "shape,dims,order",
    [((360, 480, 3), (227, 227), 1), ((20, 30, 1), (45, 50), 1), ((17, 13, 3), (5, 7), 3),
     ((12, 10, 4), (6, 5), 1), ((9, 9, 3), (9, 9), 0)],
)  # fmt: skip
def test_resize_image_is_pycaffes_with_scikit_image(shape, dims, order):
    im = np.random.default_rng(sum(shape)).random(shape).astype(np.float32) * 255
    got = resize_image(im, dims, order)
    np.testing.assert_array_equal(got, pycaffe_resize(im, dims, order))
    assert "scikit-image" in resize_behaviour()


def test_shrinking_a_photo_differs_from_scikit_image_0_14_by_anti_aliasing(monkeypatch, caplog):
    # the figure: a 360 x 480 photo to 227 x 227 moves pixels by up to ~32/255
    y, x = np.mgrid[0:360, 0:480]
    photo = ((np.sin(x / 2.0) * np.cos(y / 3.0) + 1) / 2).astype(np.float32)[:, :, None]
    photo = np.repeat(photo, 3, axis=2)
    today = resize_image(photo, (227, 227))
    monkeypatch.setattr(pycaffe_io, "_skimage", lambda: None)
    monkeypatch.setattr(pycaffe_io, "_NOTED", [])
    with caplog.at_level(logging.INFO, logger="caffe_alex"):
        old = resize_image(photo, (227, 227))
    assert 0.05 < np.abs(today - old).max() < 1
    assert [r.getMessage() for r in caplog.records if "Resizing" in r.getMessage()] == [
        "Resizing images with " + resize_behaviour()
    ]  # once
    assert "caffe-alex[pycaffe]" in resize_behaviour()
    with pytest.raises(NotImplementedError, match="interp_order=3 needs scikit-image"):
        resize_image(photo, (5, 5), 3)
