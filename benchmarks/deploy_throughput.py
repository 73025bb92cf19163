"""Deploy throughput of AlexNet on the CPU: caffe-alex's Classifier next to OpenCV 4's dnn module.

Both run the same .caffemodel (models/bvlc_alexnet/deploy.prototxt with random weights, written
to a temporary file) on the same preprocessed batch (pycaffe's steps: resize to 256x256, centre
crop 227, BGR, x255, mean 104/117/123), at batch 1 and 32, alternately in one process: each
repeat times caffe-alex's forward, then OpenCV's, so load that comes and goes hits both alike.
Printed: images/s of the forward pass for each (median of the repeats), their ratio, the largest
relative difference of the outputs (fc8 before the softmax), and caffe-alex's preprocessing rate
and end-to-end rate (PNG files on disk -> top-5) at batch 32.

    python benchmarks/deploy_throughput.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caffe_alex.net import Net
from caffe_alex.tools.deploy import Classifier, top_k
from caffe_alex.tools.pycaffe_io import load_image

DEPLOY = Path(__file__).resolve().parents[1] / "models" / "bvlc_alexnet" / "deploy.prototxt"
MEAN = np.array([104.0, 117.0, 123.0], np.float32)


def make_weights(folder: str) -> str:
    net = Net.from_prototxt(str(DEPLOY), "TEST")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.01)
            blobs[1].fill_(0.1)
    path = os.path.join(folder, "alexnet.caffemodel")
    net.save_weights(path)
    return path


def alternated_rates(fns, batch: int, repeats: int) -> list[float]:
    """Images/s of each of ``fns`` (median over ``repeats``), timed in turn: one call of each
    per repeat, after one warm-up call of each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [batch / statistics.median(t) for t in times]


def images_on_disk(folder: str, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import cv2

    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(tmp)
        clf = Classifier(str(DEPLOY), weights, image_dims=(256, 256), mean=MEAN,
                         raw_scale=255.0, channel_swap=(2, 1, 0))  # fmt: skip
        cv_net = cv2.dnn.readNetFromCaffe(str(DEPLOY), weights)
        cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        paths = images_on_disk(tmp, 32)
        images = [load_image(p) for p in paths]
        start = time.perf_counter()
        batch = clf.prepare(images, oversample=False)
        prep_rate = len(images) / (time.perf_counter() - start)
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")  # fmt: skip
        print(f"{'batch':>5} {'caffe-alex img/s':>17} {'OpenCV img/s':>13} {'ratio':>6} "
              f"{'max rel diff':>13}")  # fmt: skip
        for n in (1, 32):
            x = np.ascontiguousarray(batch[:n])
            clf.batch_size = n

            def ours(x=x):
                return clf.forward_all(x, ["fc8"])["fc8"]

            def theirs(x=x):
                cv_net.setInput(x)
                return cv_net.forward("fc8")

            rate_ours, rate_cv = alternated_rates([ours, theirs], n, args.repeats)
            a, b = ours(), theirs()
            diff = float(np.abs(a - b).max() / np.abs(b).max())
            print(f"{n:>5} {rate_ours:>17.1f} {rate_cv:>13.1f} {rate_ours / rate_cv:>6.2f} "
                  f"{diff:>13.2e}")  # fmt: skip
        clf.batch_size = 32
        start = time.perf_counter()
        for _, scores in clf.classify_files(paths, batch_size=32):
            top_k(scores, 5)
        e2e = len(paths) / (time.perf_counter() - start)
        print(
            f"caffe-alex preprocessing (375x500 -> 227 crop): {prep_rate:.1f} img/s; "
            f"end to end (PNG files -> top-5, batch 32): {e2e:.1f} img/s"
        )


if __name__ == "__main__":
    main()
