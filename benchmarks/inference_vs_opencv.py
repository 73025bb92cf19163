"""CPU inference: caffe-alex (exact path and fast path) against OpenCV's dnn module, alternated
in one run, on AlexNet, GoogLeNet, ResNet-50 and MobileNet v1 at batch 1 and 16.

Each net is its public deploy prototxt (models/bvlc_alexnet; from the corpus beside the
checkout, ../shared/corpus or CAFFE_ALEX_CORPUS: BVLC's bvlc_googlenet, KaimingHe's
ResNet-50-deploy, shicai's mobilenet_deploy) with seeded random weights (BatchNorm statistics
and Scale parameters random too, so folding has something to fold) written as a .caffemodel,
which both sides load. Per net and batch, each round runs caffe-alex exact (``Net`` under
inference_mode: Caffe's numbers), caffe-alex fast (``tools.inference.for_inference``: BatchNorm
and Scale folded into the convolutions, channels_last) and OpenCV (``readNetFromCaffe``, its
default backend), in turn. Printed: ms per batch (median of the rounds, and the minimum, the
better estimate on a shared machine), the ratios to OpenCV, the fast path's largest difference
to the exact output (relative to its largest value), and the share of the CPU's peak reached:
2 x multiply-adds (caffe_alex.tools.summary: convolutions and inner products) / time, against
the GFLOP/s of a large float32 matmul measured in the same run, before each net (torch.mm
2048 x 2048, the best seen so far: the reference peak, not the datasheet's).

    python benchmarks/inference_vs_opencv.py [--nets alexnet,googlenet,resnet50,mobilenet]
        [--batches 1,16] [--rounds 5] [--bf16] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caffe_alex  # noqa: E402, F401, I001  (first: it sets GOMP_SPINCOUNT before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from caffe_alex.net import Net  # noqa: E402
from caffe_alex.tools.inference import compare_outputs, for_inference  # noqa: E402
from caffe_alex.tools.summary import summarize  # noqa: E402

CORPUS = Path(os.environ.get("CAFFE_ALEX_CORPUS") or ROOT.parent / "shared" / "corpus")
NETS = {
    "alexnet": ROOT / "models/bvlc_alexnet/deploy.prototxt",
    "googlenet": CORPUS / "BVLC__caffe/models/bvlc_googlenet/deploy.prototxt",
    "resnet50": CORPUS / "KaimingHe__deep-residual-networks/prototxt/ResNet-50-deploy.prototxt",
    "mobilenet": CORPUS / "shicai__MobileNet-Caffe/mobilenet_deploy.prototxt",
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def random_weights(net: Net, seed: int = 0) -> None:
    """Seeded weights that keep activations in range through deep nets (He-scaled convs,
    BatchNorm statistics with positive variances, Scale near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, kind in zip(net.layer_names, net.layer_types):
            blobs = net.layer(name).blobs
            if kind in ("Convolution", "InnerProduct") and len(blobs):
                fan_in = blobs[0][0].numel()
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * (2 / fan_in) ** 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.01)
            elif kind == "BatchNorm":
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.1)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=gen) + 0.5)
                blobs[2].fill_(1.0)
            elif kind == "Scale" and len(blobs):
                blobs[0].copy_(torch.rand(blobs[0].shape, generator=gen) + 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)


def peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of a large matmul with PyTorch's threads: the reference peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def contenders(path: Path, batch: int, folder: str, bf16: bool, compile: bool = False):
    """(runs {label: fn}, blobs {label: the blobs of its last call}, net, multiply-adds per
    batch)."""
    import cv2  # imported on use: only this benchmark needs OpenCV

    net = Net.from_prototxt(str(path), "TEST")
    random_weights(net)
    weights = os.path.join(folder, f"{path.stem}.caffemodel")
    net.save_weights(weights)
    name = net.input_names[0]
    net.reshape(**{name: (batch, *net.blob_shapes[name][1:])})
    macs = summarize(net).macs
    x = torch.randn(net.blob_shapes[name], generator=torch.Generator().manual_seed(1)) * 50
    fast = for_inference(net)
    cv_net = cv2.dnn.readNetFromCaffe(str(path), weights)
    array = np.ascontiguousarray(x.numpy())

    def exact():
        with torch.inference_mode():
            return net(**{name: x})

    def opencv():
        cv_net.setInput(array)
        return cv_net.forward()

    runs = {"exact": exact, "fast": lambda: fast(**{name: x}), "OpenCV": opencv}
    blobs = {"exact": lambda: net.blobs, "fast": lambda: fast.blobs}
    if bf16:
        low = for_inference(net, bf16=True)
        runs["fast+bf16"] = lambda: low(**{name: x})
        blobs["fast+bf16"] = lambda: low.blobs
    if compile:  # the fast path traced whole and compiled; the scores kept for the diff
        scores = net.steps[-1].bottoms[0] if net.layer_types[-1] == "Softmax" else None
        built = for_inference(net, compile=True, keep=[scores] if scores else ())
        began = time.perf_counter()
        built(**{name: x})
        print(f"  ({path.stem} batch {batch}: compiled in {time.perf_counter() - began:.0f} s)")
        runs["fast+compile"] = lambda: built(**{name: x})
        blobs["fast+compile"] = lambda: built.blobs
    return runs, blobs, net, macs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also time the fast path in bf16")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the fast path compiled (torch.compile: minutes)",
    )
    args = parser.parse_args(argv)
    import cv2

    peak = peak_gflops()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), OpenCV "
          f"{cv2.__version__} ({cv2.getNumThreads()} threads); reference peak: "
          f"{peak:.1f} GFLOP/s (2048x2048 float32 matmul), {load()}")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                peak = max(peak, peak_gflops())  # the best seen: load only lowers it
                runs, blobs, net, macs = contenders(
                    NETS[name], batch, folder, args.bf16, args.compile
                )
                for fn in runs.values():  # warm-up
                    fn()
                times = {label: [] for label in runs}
                before = load()
                for _ in range(args.rounds):
                    for label, fn in runs.items():
                        times[label].append(_timed(fn) * 1e3)
                out = net.output_names[0]
                if net.layer_types[-1] == "Softmax":  # compare the scores: random ones saturate
                    out = net.steps[-1].bottoms[0]
                results_of = {label: {out: get()[out].float().numpy()}
                              for label, get in blobs.items()}  # fmt: skip
                median = {k: statistics.median(v) for k, v in times.items()}
                best = {k: min(v) for k, v in times.items()}
                print(f"{name} batch {batch}: {macs / 1e9:.2f} GMACs, peak so far {peak:.1f} "
                      f"GFLOP/s ({before} -> {load()})")  # fmt: skip
                for label in runs:
                    share = 2 * macs / (best[label] / 1e3) / 1e9 / peak
                    line = (f"  {label:10s} median {median[label]:9.1f} ms  min "
                            f"{best[label]:9.1f} ms  {share:6.1%} of peak")  # fmt: skip
                    if label != "OpenCV":
                        ratio = median[label] / median["OpenCV"]
                        diff = compare_outputs(results_of["exact"], results_of[label])[out]
                        line += f"  ratio to OpenCV {ratio:5.2f}  diff {diff:.1e}"
                    print(line)
                results[(name, batch)] = {"median": median, "min": best, "macs": macs}
    return results


if __name__ == "__main__":
    main()
