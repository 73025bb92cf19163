"""Images per second through the data feed alone (no net), next to what a user could pick instead.

The feed makes AlexNet's TRAIN batches (crop 227, mirror, mean file; batch 256) from 256x256x3
raw Datums in an LMDB, with 0 (in the calling process), 1 and 2 worker processes:
- caffe-alex's feed, host side: what a GPU run asks of the host (uint8 batches taken from the
  ring and staged into a reused buffer; the mean and scale would run on the GPU);
- caffe-alex's feed with the CPU as the device (make_feed's default path on a CPU run: the
  calling process also subtracts the mean into float32 batches, on the cores the workers use);
- a hand-written PyTorch pipeline, what a user would write without caffe-alex: a Dataset over
  the LMDB that parses each Datum, decodes it (cv2.imdecode for JPEG), crops and mirrors at
  random and subtracts the mean in NumPy, batched by torch.utils.data.DataLoader;
- the floor: a bare lmdb cursor that parses each Datum and touches its bytes (no crop, no
  transform), the least any feed must do.
Each repeat runs every pipeline in turn (each started afresh, two batches to warm up, then the
timed ones, then closed, so no pipeline prefetches while another is timed); the medians are
printed, for raw and for JPEG-encoded Datums. Then one core decoding and resizing a 500x375
JPEG to 256x256 with OpenCV (what the feed and the tools use) and with Pillow, alternately.

Run: python benchmarks/data_throughput.py [--records 512] [--batches 16] [--batch 256]
     [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import torch
from google.protobuf import text_format
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from caffe_alex.data.datum import array_to_datum, encode_image, encoded_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.loader import make_feed
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2

CROP = 227


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
      transform_param {{ crop_size: {CROP} mirror: true mean_file: "{mean}" }}
      data_param {{ source: "{path}" backend: LMDB batch_size: {batch} }} }}"""
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), "TRAIN")


# -- the pipelines: each makes a `next batch` function and a `close` --------------------------
def feed_on_cpu(net: Net, workers: int):
    """next(feed) with the CPU as the device: float32 batches, transform included."""
    feed = make_feed(net, seed=1, device="cpu", workers=workers)
    return lambda: next(feed), feed.close


def feed_host_side(net: Net, workers: int):
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

    return step, feed.close


class LmdbImages(Dataset):
    """The Dataset a PyTorch user would write for a Caffe LMDB: Datum -> random crop, mirror,
    mean subtracted, float32 CHW; the LMDB opened in each worker process."""

    def __init__(self, path: str, mean: np.ndarray):
        self.path, self.mean, self.env = path, mean, None
        with lmdb.open(path, readonly=True, lock=False) as env, env.begin() as txn:
            self.keys = list(txn.cursor().iternext(values=False))

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        if self.env is None:
            self.env = lmdb.open(self.path, readonly=True, lock=False)
        with self.env.begin() as txn:
            datum = caffe_pb2.Datum.FromString(txn.get(self.keys[index]))
        if datum.encoded:
            image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
            image = image.transpose(2, 0, 1)
        else:
            image = np.frombuffer(datum.data, np.uint8).reshape(
                datum.channels, datum.height, datum.width
            )
        rng = np.random.default_rng()
        top = rng.integers(0, image.shape[1] - CROP + 1)
        left = rng.integers(0, image.shape[2] - CROP + 1)
        crop = image[:, top : top + CROP, left : left + CROP].astype(np.float32)
        crop -= self.mean[:, top : top + CROP, left : left + CROP]
        if rng.integers(2):
            crop = crop[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(crop)), datum.label


def hand_written(path: str, mean: np.ndarray, batch: int, workers: int):
    loader = DataLoader(LmdbImages(path, mean), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True)  # fmt: skip
    state = {"it": None}

    def step():
        try:
            return next(state["it"])
        except (StopIteration, TypeError):  # the first batch, or a new epoch
            state["it"] = iter(loader)
            return next(state["it"])

    return step, lambda: state.update(it=None)  # dropping the iterator stops its workers


def pipelines(net: Net, copy: str, mean: np.ndarray, batch: int) -> dict:
    """(name, workers) -> a function starting that pipeline."""
    makers = {}
    for w in (0, 1, 2):
        makers["feed, host side", w] = lambda w=w: feed_host_side(net, w)
        makers["feed, CPU device", w] = lambda w=w: feed_on_cpu(net, w)
        makers["hand-written DataLoader", w] = lambda w=w: hand_written(copy, mean, batch, w)
    return makers


def rate_of(make, batch: int, batches: int) -> float:
    step, close = make()
    try:
        for _ in range(2):  # start-up: worker processes, first batches
            step()
        start = time.perf_counter()
        for _ in range(batches):
            step()
        return batches * batch / (time.perf_counter() - start)
    finally:
        close()


def in_turn(makers: dict, batch: int, batches: int, repeats: int) -> dict:
    """The median images/s of each pipeline, the pipelines timed in turn in each repeat."""
    rates = {name: [] for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            rates[name].append(rate_of(make, batch, batches))
    return {name: statistics.median(r) for name, r in rates.items()}


# -- one image: OpenCV and Pillow ---------------------------------------------------------------
def opencv_decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def pillow_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def per_second_in_turn(fns: dict, repeats: int) -> dict:
    """The best images/s of each (function, inputs), the functions run in turn each repeat."""
    best = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, (fn, inputs) in fns.items():
            start = time.perf_counter()
            for item in inputs:
                fn(item)
            best[name] = max(best[name], len(inputs) / (time.perf_counter() - start))
    return best


def decode_resize(jpegs: list[bytes], repeats: int) -> None:
    """One core, 500x375 JPEGs (an ImageNet-sized photo) resized to 256x256 as convert-imageset
    does; OpenCV's and Pillow's bilinear resizes differ in their pixels, not only their speed."""
    cv2.setNumThreads(1)
    hwc = [opencv_decode(j) for j in jpegs]
    pil = [pillow_decode(j) for j in jpegs]
    rows = per_second_in_turn(
        {
            "decode, OpenCV (cv2.imdecode)": (opencv_decode, jpegs),
            "decode, Pillow (Image.open)": (pillow_decode, jpegs),
            "resize, OpenCV (cv2.resize)": (lambda a: cv2.resize(a, (256, 256)), hwc),
            "resize, Pillow (BILINEAR)": (lambda a: a.resize((256, 256), Image.BILINEAR), pil),
        },
        repeats,
    )
    for name, rate in rows.items():
        print(f"  {name:34s} {rate:8.0f} images/s")
    cv2.setNumThreads(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    images = synthetic_images(args.records)
    mean_image = images.mean(0).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean = tmp / "mean.binaryproto"
        mean.write_bytes(array_to_blob_proto(mean_image[None]).SerializeToString())
        raw = [array_to_datum(a, i % 1000).SerializeToString() for i, a in enumerate(images)]
        jpeg = [
            encoded_datum(encode_image(a, "jpg"), i % 1000).SerializeToString()
            for i, a in enumerate(images)
        ]
        print(
            f"{args.records} records of 3x256x256, batch {args.batch}, crop {CROP}, mirror, "
            f"mean file; JPEG {np.mean([len(v) for v in jpeg]) / 1024:.0f} KiB each; "
            f"median of {args.repeats}, {args.batches} timed batches each"
        )
        for name, values in (("raw", raw), ("JPEG", jpeg)):
            path = write_lmdb(tmp / name, values)
            base = floor(path, passes=4)  # first: LMDB opens an environment once a process
            # the feed keeps its environment open: the hand-written pipeline reads a copy
            copy = shutil.copytree(path, tmp / f"{name}_copy")
            makers = pipelines(data_net(path, str(mean), args.batch), str(copy), mean_image,
                               args.batch)  # fmt: skip
            rates = in_turn(makers, args.batch, args.batches, args.repeats)
            print(f"({name}) floor, bare lmdb cursor + Datum parse: {base:9.0f} images/s")
            print(f"({name}) {'':24s} {'in-process':>11} {'1 worker':>9} {'2 workers':>10}")
            for title in ("feed, host side", "feed, CPU device", "hand-written DataLoader"):
                row = [rates[title, w] for w in (0, 1, 2)]
                print(f"({name}) {title:24s} {row[0]:11.0f} {row[1]:9.0f} {row[2]:10.0f}")
            hand = rates["hand-written DataLoader", 2]
            for kind in ("feed, host side", "feed, CPU device"):
                two, one = rates[kind, 2], rates[kind, 0]
                print(
                    f"({name}, {kind}) 2 workers / in-process: {two / one:.2f}; "
                    f"/ hand-written DataLoader, 2 workers each: {two / hand:.1f}"
                )
    rng = np.random.default_rng(1)
    photos = [
        encode_image(rng.integers(0, 256, (3, 375, 500), np.uint8) // 4 + 96, "jpg")
        for _ in range(40)
    ]
    print("decoding and resizing a 500x375 JPEG to 256x256, one core (best of the repeats):")
    decode_resize(photos, args.repeats)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
