"""CPU inference of two SSD detectors at batch 1: caffe-alex next to OpenCV 4's dnn module.

Nets: MobileNet-SSD (chuanqi305's deploy.prototxt from ../shared/corpus) and SSD300 VGG16
(weiliu89's deploy prototxt under tests/fork_nets). Each gets random weights written as a
.caffemodel (msra-scaled kernels, BatchNorm and Scale near identity, so that activations stay
in range), and both libraries run that file on the same preprocessed 300x300 image: caffe-alex
through the Classifier that ``caffe-alex deploy`` uses (torch.inference_mode), also with
``--channels-last`` (NHWC), and OpenCV through readNetFromCaffe with its own CPU backend. The
timed calls alternate (caffe-alex, caffe-alex NHWC, OpenCV, caffe-alex, ...) so that a change
in the machine's load falls on all three. Printed: the median milliseconds per image of each,
caffe-alex's ratios to OpenCV, the largest difference between caffe-alex and OpenCV on the
class scores before the softmax (mbox_conf, relative to its largest value), and the boxes
caffe-alex's DetectionOutput kept. With random weights DetectionOutput's share of the time
depends on how many boxes pass the net's confidence_threshold (MobileNet-SSD 0.25, SSD300
0.01); trained weights usually keep fewer.

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
            for index, blob in enumerate(blobs):
                values = torch.randn(blob.shape, generator=gen)
                if kind == "BatchNorm":  # mean near 0, variance near 1, scale factor 1
                    values = (0.1 * values.abs() + (0.0, 1.0)[index]) if index < 2 else 1.0
                elif kind == "Scale" and index == 0:  # gamma about 1
                    values = 1.0 + 0.1 * values
                elif kind == "Normalize":  # SSD's conv4_3 scale starts at 20
                    values = 20.0 + values
                elif blob.dim() > 1:  # msra: activations keep their size through the layers
                    values *= (2.0 / blob[0].numel()) ** 0.5
                else:  # biases
                    values *= 0.01
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
    clf, nhwc = (Classifier(str(prototxt), weights, mean=mean, raw_scale=255.0,
                            input_scale=scale, channel_swap=(2, 1, 0), channels_last=last)
                 for last in (False, True))  # fmt: skip
    image = np.random.default_rng(0).random((375, 500, 3)).astype(np.float32)
    x = np.ascontiguousarray(clf.prepare([image], oversample=False))
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def ours():
        return clf.forward_all(x, ["detection_out"])["detection_out"]

    def ours_nhwc():
        return nhwc.forward_all(x, ["detection_out"])["detection_out"]

    def theirs():
        cv_net.setInput(x)
        return cv_net.forward("detection_out")

    ms_ours, ms_nhwc, ms_cv = (1000 * t for t in alternate([ours, ours_nhwc, theirs], repeats))
    conf = clf.forward_all(x, ["mbox_conf"])["mbox_conf"]
    cv_net.setInput(x)
    cv_conf = cv_net.forward("mbox_conf")
    diff = float(np.abs(conf - cv_conf.reshape(conf.shape)).max() / np.abs(cv_conf).max())
    kept = int((ours()[..., 1] >= 0).sum())  # rows with a label (not the -1 placeholder)
    print(f"{name:<14} {ms_ours:>11.1f} {ms_nhwc:>11.1f} {ms_cv:>11.1f} {ms_ours / ms_cv:>6.2f} "
          f"{ms_nhwc / ms_cv:>6.2f} {diff:>9.1e} {kept:>6}")  # fmt: skip


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
    print(f"{'net':<14} {'caffe-alex':>11} {'NHWC':>11} {'OpenCV':>11} {'ratio':>6} {'ratio':>6} "
          f"{'conf diff':>9} {'boxes':>6}")  # fmt: skip
    print(f"{'':<14} {'ms/image':>11} {'ms/image':>11} {'ms/image':>11} {'':>6} {'NHWC':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            run(name.strip(), args.repeats, tmp)


if __name__ == "__main__":
    main()
