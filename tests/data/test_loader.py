"""The feed (caffe_alex.data.loader): uint8 records through the ring and the transform on the
device give the batches the sources and the CPU DataTransformer (itself checked against a
transcription of Caffe's loops) make record by record, at the stream positions and with the
draws the feed promises, for any worker count, rank and seed; workers report
errors as one line and a dead worker is an error, not a hang; decode="gpu" without torchvision
is a one-line error, and with a decoder standing in for torchvision's it gives the same batches.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
import types

import cv2
import numpy as np
import pytest
import torch

from caffe_alex.data.datum import array_to_datum, encode_image, encoded_datum
from caffe_alex.data.loader import make_feed
from caffe_alex.data.sources import DBSource, ImageListSource
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from tests.data.test_sources import IMAGES, image_list, image_net, write_db  # noqa: F401
from tests.reference import parse_net


@pytest.fixture
def mean_file(tmp_path):
    mean = np.random.default_rng(1).uniform(0, 255, (1, 3, 8, 9)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(array_to_blob_proto(mean).SerializeToString())
    return str(path)


def net_over(values, tmp_path, phase="TRAIN", transform="", batch=4, name="db"):
    source = write_db(tmp_path / name, "lmdb", values)
    text = f"""layer {{ name: "d" type: "Data" top: "data" top: "label" {transform}
      data_param {{ source: "{source}" backend: LMDB batch_size: {batch} }} }}"""
    return Net(parse_net(text), phase)


def raw(images=IMAGES):
    return [array_to_datum(a, i).SerializeToString() for i, a in enumerate(images)]


def encoded(fmt, images=IMAGES):
    datums = [encoded_datum(encode_image(a, fmt), i) for i, a in enumerate(images)]
    return [d.SerializeToString() for d in datums]


def batches(net, n, **options):
    feed = make_feed(net, **options)
    try:
        return [next(feed) for _ in range(n)]
    finally:
        feed.close()


def expected(net, n, seed, rank=0, world_size=1):
    """The feed's contract, made without it: batch b of a layer holds stream positions
    (b * batch + i) * world_size + rank, each record is source.sample(position, rng) (the
    DataTransformer on the CPU) with rng seeded by (seed, layer index, position)."""
    layers = []
    for index, lp in enumerate(net.net_param.layer):
        if lp.type == "Data":
            layers.append((index, lp, DBSource(lp, net.phase, seed)))
        elif lp.type == "ImageData":
            layers.append((index, lp, ImageListSource(lp, net.phase, seed)))
    out = []
    for b in range(n):
        batch = {}
        for index, lp, source in layers:
            size = net.blob_shapes[lp.top[0]][0]
            rows = []
            for i in range(size):
                position = (b * size + i) * world_size + rank
                rng = np.random.default_rng((seed, index, position))
                rows.append(source.sample(position, rng if source.needs_rng else None))
            for k, top in enumerate(lp.top):
                batch[top] = torch.from_numpy(np.stack([np.float32(r[k]) for r in rows]))
        out.append(batch)
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == torch.float32
            np.testing.assert_array_equal(g[k].numpy(), w[k].numpy(), err_msg=k)


TRANSFORMS = [
    "transform_param { crop_size: 5 mirror: true scale: 0.5 mean_file: 'MEAN' }",
    "transform_param { crop_size: 5 mirror: true scale: 0.017 mean_value: [10, 20, 30] }",
    "transform_param { mirror: true mean_value: 104 }",
    "",
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_uint8_ring_equals_the_cpu_transformer(tmp_path, mean_file, transform, phase):
    net = net_over(raw(), tmp_path, phase, transform.replace("MEAN", mean_file))
    want = expected(net, 4, seed=5)
    assert_same(batches(net, 4, seed=5, workers=0), want)
    if transform == TRANSFORMS[0]:  # the worker counts and ranks, once
        assert_same(batches(net, 4, seed=5, workers=1, prefetch=1), want)
        assert_same(batches(net, 4, seed=5, workers=2), want)
        for rank in (0, 1):
            options = {"seed": 5, "rank": rank, "world_size": 2}
            want = expected(net, 3, **options)
            assert_same(batches(net, 3, workers=2, **options), want)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_encoded_datums_decode_in_the_workers(tmp_path, mean_file, fmt):
    transform = f"transform_param {{ crop_size: 6 mirror: true mean_file: '{mean_file}' }}"
    net = net_over(encoded(fmt), tmp_path, "TRAIN", transform)
    want = expected(net, 3, seed=2)
    assert_same(batches(net, 3, seed=2, workers=0), want)
    assert_same(batches(net, 3, seed=2, workers=2), want)


def test_image_data_through_workers(image_list):  # noqa: F811
    listing, root = image_list
    params = f"root_folder: '{root}' new_height: 7 new_width: 6 shuffle: true"
    net = image_net(listing, "TRAIN", params, transform="transform_param { mirror: true }")
    want = expected(net, 3, seed=4)
    assert_same(batches(net, 3, seed=4, workers=2), want)
    rows = [cv2.resize(cv2.imread(f"{root}image {i}.png"), (6, 7)) for i in range(6)]
    order, mirrored = want[0]["label"].long().tolist(), want[0]["data"].numpy()
    for k, i in enumerate(order):
        image = rows[i].transpose(2, 0, 1).astype(np.float32)
        assert np.array_equal(mirrored[k], image) or np.array_equal(mirrored[k], image[..., ::-1])


def test_batches_kept_by_the_caller_outlive_the_ring(tmp_path):
    net = net_over(raw(), tmp_path, "TRAIN", TRANSFORMS[1])
    want = expected(net, 9, seed=8)
    for workers in (0, 2):
        feed = make_feed(net, seed=8, workers=workers, prefetch=2)
        kept = [next(feed) for _ in range(9)]  # more batches than the ring holds
        assert len(feed._producer.ring) == (2 if workers else 1)
        feed.close()
        assert_same(kept, want)


def test_skip_and_resume_with_workers(tmp_path):
    net = net_over(raw(), tmp_path, "TRAIN", TRANSFORMS[1])
    want = batches(net, 6, seed=3, workers=0)
    feed = make_feed(net, seed=3, workers=2)
    assert_same([next(feed)], want[:1])
    feed.skip(3)
    assert_same([next(feed)], want[4:5])
    feed.load_state({**feed.state(), "position": 2})
    assert_same([next(feed), next(feed)], want[2:4])
    feed.close()


def test_float_records_keep_the_float_path(tmp_path):
    floats = np.random.default_rng(0).normal(0, 50, (10, 3, 8, 9)).astype(np.float32)
    net = net_over(raw(floats), tmp_path, "TRAIN", TRANSFORMS[1])
    feed = make_feed(net, seed=1, workers=0)
    assert feed.layers[0].travel == "arrays"
    assert_same([next(feed)], expected(net, 1, seed=1))


def test_a_float_record_in_a_uint8_source_is_an_error(tmp_path):
    values = raw()[:3] + [array_to_datum(IMAGES[3].astype(np.float32), 3).SerializeToString()]
    net = net_over(values, tmp_path, "TEST")
    with pytest.raises(CaffeAlexError, match="record '00000003'.*holds float_data, but the first"):
        batches(net, 1, workers=0)


def test_mean_values_that_do_not_fit_the_channels_name_the_layer(tmp_path):
    net = net_over(raw(), tmp_path, "TEST", "transform_param { mean_value: [1, 2] }")
    with pytest.raises(CaffeAlexError, match=r"layer 'd' \(Data\): specify either 1 mean_value"):
        make_feed(net)


def test_worker_errors_are_one_line_and_stop_the_workers(tmp_path):
    values = raw()[:5] + [b"\xff\xff\xff"] + raw()[6:]
    net = net_over(values, tmp_path, "TEST", batch=2)
    feed = make_feed(net, seed=0, workers=2)
    next(feed), next(feed)
    with pytest.raises(CaffeAlexError) as caught:
        next(feed)
    assert "\n" not in str(caught.value)
    assert "layer 'd' (Data)" in str(caught.value) and "record '00000005'" in str(caught.value)
    assert feed._producer is None  # the workers are gone
    feed.close()


@pytest.mark.slow
def test_a_dead_worker_is_an_error_not_a_hang(tmp_path):
    net = net_over(raw(), tmp_path, "TEST", batch=2)
    feed = make_feed(net, seed=0, workers=1, prefetch=1)
    next(feed)
    worker = feed._producer.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(5)
    with pytest.raises(CaffeAlexError, match=r"data worker 0 \(pid \d+\) died \(signal 9"):
        for _ in range(5):
            next(feed)
    feed.close()


@pytest.mark.slow
def test_workers_leave_interrupts_to_the_feeding_process(tmp_path):
    net = net_over(raw(), tmp_path, "TEST", batch=2)
    feed = make_feed(net, seed=0, workers=1)
    want = batches(net, 3, seed=0, workers=0)
    got = [next(feed)]
    os.kill(feed._producer.processes[0].pid, signal.SIGINT)
    time.sleep(0.2)
    got += [next(feed), next(feed)]
    assert feed._producer.processes[0].is_alive()
    feed.close()
    assert_same(got, want)


# -- decode="gpu" ----------------------------------------------------------------------------
def test_gpu_decode_without_torchvision_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    net = net_over(encoded("jpg"), tmp_path, "TEST")
    with pytest.raises(CaffeAlexError, match=r"decode='gpu' needs torchvision.*pip install") as e:
        make_feed(net, decode="gpu")
    assert "\n" not in str(e.value)
    with pytest.raises(CaffeAlexError, match="decode must be one of cpu, gpu"):
        make_feed(net, decode="nvjpeg")


def stand_in_torchvision():
    """torchvision.io's decode_jpeg (RGB or grey channels first) played by OpenCV."""
    io = types.ModuleType("torchvision.io")
    io.ImageReadMode = enum.Enum("ImageReadMode", "UNCHANGED GRAY RGB")
    io.calls = []

    def decode_jpeg(tensors, mode, device, apply_exif_orientation):
        io.calls.append((len(tensors), mode.name, str(device), apply_exif_orientation))
        flag = {"RGB": cv2.IMREAD_COLOR, "GRAY": cv2.IMREAD_GRAYSCALE}.get(mode.name, -1)
        out = []
        for t in tensors:
            image = cv2.imdecode(t.numpy(), flag)
            if image is None:
                raise RuntimeError("Unsupported marker type 0x42")  # as torchvision reports
            image = image[None] if image.ndim == 2 else image[..., ::-1].transpose(2, 0, 1)
            out.append(torch.from_numpy(image.copy()).to(device))
        return out

    io.decode_jpeg = decode_jpeg
    module = types.ModuleType("torchvision")
    module.io = io
    return module


@pytest.mark.parametrize("force", ["", "force_gray: true"])
def test_gpu_decode_gives_the_cpu_decode_batches(tmp_path, mean_file, monkeypatch, force):
    vision = stand_in_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.io", vision.io)
    mean = "" if force else f"mean_file: '{mean_file}'"
    transform = f"transform_param {{ crop_size: 5 mirror: true scale: 0.5 {mean} {force} }}"
    values = encoded("jpg")[:7] + encoded("png")[7:]  # PNGs are decoded by OpenCV
    net = net_over(values, tmp_path, "TRAIN", transform)
    want = batches(net, 3, seed=6, workers=0)
    feed = make_feed(net, seed=6, decode="gpu", device="cpu")
    assert feed.layers[0].travel == "decode"
    assert_same([next(feed) for _ in range(3)], want)
    mode = "GRAY" if force else "UNCHANGED"
    assert vision.io.calls[0] == (4, mode, "cpu", bool(force))


def test_gpu_decode_errors_name_the_layer(tmp_path, monkeypatch):
    vision = stand_in_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.io", vision.io)
    broken = encoded_datum(b"\xff\xd8\xff broken", 1).SerializeToString()
    net = net_over(encoded("jpg")[:2] + [broken] + encoded("jpg")[3:], tmp_path, "TEST")
    feed = make_feed(net, decode="gpu")
    with pytest.raises(CaffeAlexError, match=r"layer 'd' \(Data\): cannot decode the JPEGs of a "
                       r"batch from record '00000000'.*Unsupported marker"):  # fmt: skip
        next(feed)


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_batches_equal_the_cpu_batches(tmp_path, mean_file, workers):
    """Pinned staging, the side-stream copy and the batched kernels, against the CPU path."""
    transform = TRANSFORMS[0].replace("MEAN", mean_file)
    net = net_over(raw(), tmp_path, "TRAIN", transform)
    want = batches(net, 5, seed=9, workers=0)
    got = batches(net, 5, seed=9, workers=workers, device="cuda")
    assert all(t.device.type == "cuda" for b in got for t in b.values())
    torch.cuda.synchronize()
    assert_same([{k: v.cpu() for k, v in b.items()} for b in got], want)
