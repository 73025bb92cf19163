"""Images per second through the data feed alone (no net), next to floors measured in the same run.

The feed makes AlexNet's TRAIN batches (crop 227, mirror, mean file; batch 256) from 256x256x3
raw Datums in an LMDB, with 0 (in the calling process), 1 and 2 worker processes:
- the uint8 ring, host side: what a GPU run asks of the host (uint8 batches taken from the ring
  and staged into a reused buffer; the mean and scale would run on the GPU);
- the uint8 ring with the CPU as the device (make_feed's default path on a CPU run: the calling
  process also subtracts the mean into fresh float32 batches, on the cores the workers use);
- the former float32 path (``transport="float32"``: the whole transform on the CPU, float32
  batches through torch.utils.data workers in fresh shared memory);
- the floor: a bare lmdb cursor that parses each Datum and touches its bytes (no crop, no
  transform), the least any feed must do.
Then the same for JPEG-encoded Datums (decoded in the workers), and the speed of decoding and
resizing one image with OpenCV (what the feed and the tools use) and with the former Pillow
decoding and NumPy resize. The ratios the issue asks for are printed last.

Run: python benchmarks/data_throughput.py [--records 512] [--batches 16] [--batch 256]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
from google.protobuf import text_format
from PIL import Image

from caffe_alex.data.datum import array_to_datum, encode_image, encoded_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.loader import make_feed
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2


def synthetic_images(n: int) -> np.ndarray:
    """Smooth gradients plus noise: photo-like enough that JPEG sizes are realistic."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    base = np.stack([(x + y) / 2, x, y]).astype(np.float32)
    out = np.empty((n, 3, 256, 256), np.uint8)
    for i in range(n):
        noise = rng.normal(0, 12, base.shape)
        out[i] = np.clip(base * rng.uniform(0.5, 1.0) + noise, 0, 255).astype(np.uint8)
    return out


def write_lmdb(path: Path, values: list[bytes]) -> str:
    with open_db(str(path), "lmdb", mode="new") as db:
        txn = db.transaction()
        for i, value in enumerate(values):
            txn.put(f"{i:08d}", value)
        txn.commit()
    return str(path)


def floor(path: str, passes: int) -> float:
    env = lmdb.open(path, readonly=True, lock=False)
    count, start = 0, time.perf_counter()
    for _ in range(passes):
        with env.begin() as txn:
            for _, value in txn.cursor():
                datum = caffe_pb2.Datum.FromString(value)
                np.frombuffer(datum.data, np.uint8).sum(dtype=np.uint32)  # touch the bytes
                count += 1
    env.close()
    return count / (time.perf_counter() - start)


def data_net(path: str, mean: str, batch: int) -> Net:
    text = f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
      transform_param {{ crop_size: 227 mirror: true mean_file: "{mean}" }}
      data_param {{ source: "{path}" backend: LMDB batch_size: {batch} }} }}"""
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), "TRAIN")


def timed(step, batch: int, batches: int) -> float:
    for _ in range(2):  # start-up: worker processes, first batches
        step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch / (time.perf_counter() - start)


def feed_rate(net: Net, batch: int, batches: int, **options) -> float:
    """next(feed) with the CPU as the device: float32 batches, transform included."""
    feed = make_feed(net, seed=1, device="cpu", **options)
    rate = timed(lambda: next(feed), batch, batches)
    feed.close()
    return rate


def host_rate(net: Net, batch: int, batches: int, workers: int) -> float:
    """What a GPU run asks of the host: each uint8 batch (crops, draws, labels) taken from the
    ring and copied into a reused staging buffer, as the feed does before its non-blocking copy
    to the device (where the mean and scale then run). Uses the feed's internals."""
    feed = make_feed(net, seed=1, device="cpu", workers=workers)
    feed._producer = feed._start()
    staging = {}

    def step():
        views = feed._producer.take(feed.position)
        for key, array in views.items():
            if key not in staging:
                staging[key] = np.empty_like(array)
            np.copyto(staging[key], array)
        feed._producer.give_back()
        feed.position += 1

    rate = timed(step, batch, batches)
    feed.close()
    return rate


# -- the former decoding and resizing (Pillow, and a NumPy transcription of cv::resize) ---------
def former_decode(data: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def _axis_weights(src: int, dst: int):
    f = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    edge = (i < 0) | (i >= src - 1)
    f[edge] = 0
    i = np.clip(i, 0, src - 1)
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    return i, np.minimum(i + 1, src - 1), w0, w1


def former_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    x0, x1, a0, a1 = _axis_weights(array.shape[2], width)
    y0, y1, b0, b1 = _axis_weights(array.shape[1], height)
    src = array.astype(np.int32)
    rows = src[:, :, x0] * a0
    rows += src[:, :, x1] * a1
    rows >>= 4
    out = rows[:, y0] * b0[:, None]
    out >>= 16
    lower = rows[:, y1] * b1[:, None]
    lower >>= 16
    out += lower + 2
    out >>= 2
    return out.astype(np.uint8)


def opencv_decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def opencv_resize(hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR)


def per_second(fn, items, repeat=3) -> float:
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def decode_resize(jpegs: list[bytes]) -> None:
    """OpenCV against the former Pillow decode and NumPy resize, one core, 500x375 JPEGs (an
    ImageNet-sized photo) resized to 256x256 as convert-imageset does."""
    cv2.setNumThreads(1)
    chw = [former_decode(j) for j in jpegs]
    hwc = [opencv_decode(j) for j in jpegs]
    rows = [
        ("decode, OpenCV (cv2.imdecode)", per_second(opencv_decode, jpegs)),
        ("decode, Pillow (former)", per_second(former_decode, jpegs)),
        ("resize, OpenCV (cv2.resize)", per_second(lambda a: opencv_resize(a, 256, 256), hwc)),
        ("resize, NumPy (former)", per_second(lambda a: former_resize(a, 256, 256), chw)),
    ]
    for name, rate in rows:
        print(f"  {name:34s} {rate:8.0f} images/s")
    cv2.setNumThreads(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    images = synthetic_images(args.records)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean = tmp / "mean.binaryproto"
        mean.write_bytes(array_to_blob_proto(images.mean(0)[None]).SerializeToString())
        raw = [array_to_datum(a, i % 1000).SerializeToString() for i, a in enumerate(images)]
        jpeg = [
            encoded_datum(encode_image(a, "jpg"), i % 1000).SerializeToString()
            for i, a in enumerate(images)
        ]
        print(
            f"{args.records} records of 3x256x256, batch {args.batch}, crop 227, mirror, "
            f"mean file; JPEG {np.mean([len(v) for v in jpeg]) / 1024:.0f} KiB each"
        )
        runs = [("host", "uint8 ring, host side", w) for w in (0, 1, 2)]
        runs += [("uint8", "uint8 ring, CPU device", w) for w in (0, 1, 2)]
        runs += [("float32", "float32 (former)", w) for w in (0, 1, 2)]
        for name, values in (("raw", raw), ("JPEG", jpeg)):
            path = write_lmdb(tmp / name, values)
            net = data_net(path, str(mean), args.batch)
            base = floor(path, passes=4)
            print(f"({name}) floor, bare lmdb cursor + Datum parse: {base:9.0f} images/s")
            for kind, title, workers in runs:
                if kind == "host":
                    rate = host_rate(net, args.batch, args.batches, workers)
                else:
                    rate = feed_rate(net, args.batch, args.batches, workers=workers,
                                     transport=kind)  # fmt: skip
                rates[name, kind, workers] = rate
                print(
                    f"({name}) {title:22s} {workers} worker(s): {rate:7.0f} images/s"
                    f"   floor / feed = {base / rate:5.1f}"
                )
    rng = np.random.default_rng(1)
    photos = [
        encode_image(rng.integers(0, 256, (3, 375, 500), np.uint8) // 4 + 96, "jpg")
        for _ in range(40)
    ]
    print("decoding and resizing a 500x375 JPEG to 256x256, one core:")
    decode_resize(photos)
    for name in ("raw", "JPEG"):
        old = rates[name, "float32", 2]  # the former worker path, as many workers
        for kind in ("host", "uint8"):
            two, one = rates[name, kind, 2], rates[name, kind, 0]
            print(
                f"({name}, {'host side' if kind == 'host' else 'CPU device'}) 2 workers / "
                f"in-process: {two / one:.2f} (target >= 1.5); uint8 ring / float32 path, "
                f"2 workers each: {two / old:.1f} (target >= 3)"
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
