"""CPU inference of two SSD detectors at batch 1: caffe-alex next to OpenCV 4's dnn module.

Nets: MobileNet-SSD (chuanqi305's deploy.prototxt from ../shared/corpus) and SSD300 VGG16
(weiliu89's deploy prototxt under tests/fork_nets). Each gets random weights written as a
.caffemodel (BatchNorm statistics kept positive), and both libraries run that file on the same
preprocessed 300x300 image: caffe-alex through the Classifier that ``caffe-alex deploy`` uses
(torch.inference_mode), OpenCV through readNetFromCaffe with its own CPU backend. The timed
calls alternate (caffe-alex, OpenCV, caffe-alex, ...) so that a change in the machine's load
falls on both; printed are the median milliseconds per image of each, their ratio, and how far
apart the two are on the last blob before DetectionOutput (mbox_conf_flatten).

With random weights every class scores about 1/21, so DetectionOutput's work depends on the
net's confidence_threshold: MobileNet-SSD's 0.25 keeps nothing, SSD300's 0.01 keeps thousands
of candidates for NMS; trained weights fall in between.

    python benchmarks/fork_inference_vs_opencv.py [--repeats 20] [--threads N]
                                                  [--nets mobilenet-ssd,ssd300]
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
from caffe_alex.tools.deploy import Classifier

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
NETS = {
    # name: (prototxt, mean, input scale) as each net's own demo script preprocesses
    "mobilenet-ssd": (CORPUS / "chuanqi305__MobileNet-SSD" / "deploy.prototxt", 127.5, 0.007843),
    "ssd300": (None, (104.0, 117.0, 123.0), None),  # found in tests/fork_nets below
}


def ssd300_prototxt() -> Path:
    """weiliu89's SSD300 VGG16 deploy net among tests/fork_nets (a Normalize layer and a
    300 x 300 input)."""
    for path in sorted((ROOT / "tests" / "fork_nets").rglob("*.prototxt")):
        text = path.read_text(errors="replace")
        if "SSD_300x300" in str(path) and "deploy" in path.name and '"Normalize"' in text:
            return path
    raise SystemExit("no SSD300 deploy prototxt under tests/fork_nets")


def random_weights(prototxt: Path, folder: str) -> str:
    net = Net.from_prototxt(str(prototxt), "TEST")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer(name).type_name
            for blob in blobs:
                values = torch.randn(blob.shape, generator=gen)
                fan_in = blob[0].numel() if blob.dim() > 1 else 1
                if kind == "BatchNorm":  # mean, variance, scale factor: keep them positive
                    values = values.abs() + 0.5
                elif kind == "Normalize":
                    values = values.abs() + 10.0
                else:
                    values *= (2.0 / fan_in) ** 0.5  # msra: activations stay in range
                blob.copy_(values)
    path = os.path.join(folder, f"{prototxt.parent.name}.caffemodel")
    net.save_weights(path)
    return path


def alternate(fns, repeats: int) -> list[float]:
    """Median seconds of each function, called in turn ``repeats`` times after a warm-up."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(name: str, repeats: int, folder: str) -> None:
    import cv2

    prototxt, mean, scale = NETS[name]
    prototxt = prototxt or ssd300_prototxt()
    weights = random_weights(prototxt, folder)
    mean = np.array(mean if isinstance(mean, tuple) else (mean,) * 3, np.float32)
    clf = Classifier(str(prototxt), weights, mean=mean, raw_scale=255.0, input_scale=scale,
                     channel_swap=(2, 1, 0))  # fmt: skip
    image = np.random.default_rng(0).random((375, 500, 3)).astype(np.float32)
    x = np.ascontiguousarray(clf.prepare([image], oversample=False))
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def ours():
        return clf.forward_all(x, ["detection_out"])["detection_out"]

    def theirs():
        cv_net.setInput(x)
        return cv_net.forward("detection_out")

    ms_ours, ms_cv = (1000 * t for t in alternate([ours, theirs], repeats))
    conf = clf.forward_all(x, ["mbox_conf_flatten"])["mbox_conf_flatten"]
    cv_net.setInput(x)
    cv_conf = cv_net.forward("mbox_conf_flatten")
    diff = float(np.abs(conf - cv_conf.reshape(conf.shape)).max() / np.abs(cv_conf).max())
    kept = int((ours()[..., 1] >= 0).sum())  # rows with a label (not the -1 placeholder)
    print(f"{name:<14} {ms_ours:>11.1f} {ms_cv:>11.1f} {ms_ours / ms_cv:>6.2f} {diff:>12.1e} "
          f"{kept:>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--nets", default="mobilenet-ssd,ssd300")
    args = parser.parse_args()
    import cv2

    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), batch 1, "
          f"median of {args.repeats} alternating runs")  # fmt: skip
    print(f"{'net':<14} {'caffe-alex':>11} {'OpenCV':>11} {'ratio':>6} {'conf rel diff':>12} "
          f"{'boxes':>6}")  # fmt: skip
    print(f"{'':<14} {'ms/image':>11} {'ms/image':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            run(name.strip(), args.repeats, tmp)


if __name__ == "__main__":
    main()
