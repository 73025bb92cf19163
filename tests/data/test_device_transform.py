"""The device half of the DataTransformer: uint8 crops cut by ``crop_region`` and finished by
DeviceTransform equal the CPU DataTransformer bit for bit (itself checked against a transcription
of Caffe's loops in test_transformer.py), on both paths: record by record (CPU) and batched in
torch kernels (the GPU's path, run here on the CPU, and on CUDA where there is one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.data.device_transform import DeviceTransform, Recycler, crop_on_device
from caffe_alex.data.transformer import DataTransformer
from tests.data.test_transformer import make_param

IMAGES = np.random.default_rng(3).integers(0, 256, (12, 3, 7, 9)).astype(np.uint8)
# (device, batched): record by record on the CPU, and the GPU's batched kernels
PATHS = [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=pytest.mark.gpu)]


def host_half(transformer, images, seeds):
    """What the feed's workers do: crop, mirror, keep the draws."""
    crops, draws = [], []
    for image, seed in zip(images, seeds):
        region, drawn = transformer.crop_region(image, np.random.default_rng(seed))
        crops.append(region[:, :, ::-1] if drawn[0] else region)
        draws.append(drawn)
    return torch.from_numpy(np.stack(crops)), torch.tensor(draws, dtype=torch.int32)


CASES = [
    (0, False, 1.0, None),
    (5, False, 1.0, None),
    (5, True, 0.00390625, "file"),
    (4, True, 0.5, [104.0]),
    (0, True, 2.0, [104.0, 117.0, 123.0]),
    (7, False, 0.017, "file"),
    (3, True, 1.0, "file"),
    (6, True, 0.1, None),
]


@pytest.mark.parametrize("device,batched", PATHS)
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("crop,mirror,scale,mean", CASES)
def test_equals_the_cpu_transformer(tmp_path, device, batched, phase, crop, mirror, scale, mean):
    param, _ = make_param(tmp_path, crop, mirror, scale, mean)
    transformer = DataTransformer(param, phase)
    seeds = range(len(IMAGES))
    want = np.stack([transformer(im, np.random.default_rng(s)) for im, s in zip(IMAGES, seeds)])
    pixels, draws = host_half(transformer, IMAGES, seeds)
    device_half = DeviceTransform(transformer, 3, device, batched=batched)
    got = device_half(pixels.to(device), draws.to(device))
    assert got.dtype == torch.float32 and got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_mirrored_records_read_the_mean_at_their_own_columns(tmp_path):
    # a constant image isolates the mean: each output pixel is (200 - mean at its source)
    param, mean = make_param(tmp_path, crop=5, mirror=True, mean="file")
    transformer = DataTransformer(param, "TRAIN")
    image = np.full((3, 7, 9), 200, np.uint8)
    pixels, draws = host_half(transformer, [image] * 16, range(16))
    assert {int(m) for m in draws[:, 0]} == {0, 1}
    for batched in (False, True):
        out = DeviceTransform(transformer, 3, "cpu", batched=batched)(pixels, draws).numpy()
        for i, (mirror, y, x) in enumerate(draws.tolist()):
            region = 200 - mean[:, y : y + 5, x : x + 5]
            np.testing.assert_array_equal(out[i], region[:, :, ::-1] if mirror else region)


def test_crop_on_device_draws_as_the_host_does(tmp_path):
    param, _ = make_param(tmp_path, crop=4, mirror=True)
    transformer = DataTransformer(param, "TRAIN")
    for seed, image in enumerate(IMAGES):
        rng = np.random.default_rng(seed)
        crop, draws = crop_on_device(torch.from_numpy(image), transformer, rng)
        region, want = transformer.crop_region(image, np.random.default_rng(seed))
        assert draws == want
        np.testing.assert_array_equal(crop.numpy(), region[:, :, ::-1] if want[0] else region)


def test_outputs_reuse_memory_only_once_nothing_refers_to_it():
    recycler = Recycler()
    first = torch.from_numpy(recycler.empty((2, 3), np.float32))
    view = first[1]  # a view keeps the memory alive after its tensor is gone
    del first
    second = recycler.empty((2, 3), np.float32)
    assert second.ctypes.data != view.data_ptr() - 12
    address = view.data_ptr() - 12
    del view
    third = recycler.empty((2, 3), np.float32)
    assert third.ctypes.data == address  # reused, not allocated again
    assert recycler.empty((3, 2), np.float32).ctypes.data not in (address, second.ctypes.data)
