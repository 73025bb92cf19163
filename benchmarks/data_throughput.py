"""Images per second through the data pipeline, next to a floor measured in the same run.

(a) raw 256x256x3 Datums with AlexNet's TRAIN transform (crop 227, mirror, mean file) and
(b) the same images as JPEG-encoded Datums, each through make_feed with 1 and 2 workers (and
0: in the calling process, for comparison). The
floor reads the same records with a bare lmdb cursor, parses the Datum and wraps its bytes with
numpy.frombuffer (no decode, no transform); the ratio floor/pipeline says what the pipeline costs.
Run: python benchmarks/data_throughput.py [--records 256] [--batches 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
from google.protobuf import text_format

from caffe_alex.data.datum import array_to_datum, encode_image, encoded_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.loader import make_feed
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2

BATCH = 32


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


def pipeline(path: str, mean: str, workers: int, batches: int) -> float:
    text = f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
      transform_param {{ crop_size: 227 mirror: true mean_file: "{mean}" }}
      data_param {{ source: "{path}" backend: LMDB batch_size: {BATCH} }} }}"""
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), "TRAIN")
    feed = make_feed(net, seed=1, workers=workers)
    for _ in range(max(1, 2 * workers)):  # start-up: worker processes, first batches
        next(feed)
    start = time.perf_counter()
    for _ in range(batches):
        next(feed)
    rate = batches * BATCH / (time.perf_counter() - start)
    feed.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24)
    args = parser.parse_args()
    images = synthetic_images(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean = tmp / "mean.binaryproto"
        mean.write_bytes(array_to_blob_proto(images.mean(0)[None]).SerializeToString())
        raw = [array_to_datum(a, i % 1000).SerializeToString() for i, a in enumerate(images)]
        jpeg = [
            encoded_datum(encode_image(a, "jpg"), i % 1000).SerializeToString()
            for i, a in enumerate(images)
        ]
        print(f"{args.records} records; JPEG {np.mean([len(v) for v in jpeg]) / 1024:.0f} KiB each")
        for name, values in (("raw 256x256x3", raw), ("JPEG-encoded", jpeg)):
            path = write_lmdb(tmp / name.split()[0], values)
            base = floor(path, passes=4)
            print(f"({name}) floor, bare lmdb cursor + numpy: {base:9.0f} images/s")
            for workers in (0, 1, 2):
                rate = pipeline(path, str(mean), workers, args.batches)
                print(
                    f"({name}) make_feed, {workers} worker(s):   {rate:9.0f} images/s"
                    f"  (floor / pipeline = {base / rate:.1f})"
                )


if __name__ == "__main__":
    main()
