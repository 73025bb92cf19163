"""The checks that need a GPU, in one run: prints figures, exits non-zero if a check fails.

    python benchmarks/gpu_check.py [--device cuda:0]

1. AlexNet deploy on the GPU against the CPU (same weights, same batch): max relative error.
2. AlexNet forward+backward at batch 32 (train_val, TRAIN) on the GPU, fp32 and bf16 autocast,
   against the hand-written nn.Module of benchmarks/alexnet_cpu.py, alternating in one run.
3. AlexNet training iterations at batch 256 (benchmarks/train_alexnet.py on the GPU): the
   Solver against a hand-written PyTorch loop with the same SGD update.
4. The test-suite's CUDA tests (``pytest -k cuda``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import train_alexnet  # noqa: E402
from benchmarks.alexnet_cpu import build_pair, step_caffe_alex, step_reference, timed  # noqa: E402
from caffe_alex.net import Net  # noqa: E402


def parity(device: torch.device) -> float:
    net = Net.from_prototxt(str(ROOT / "models/bvlc_alexnet/deploy.prototxt"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            fan_in = math.prod(blobs[0].shape[1:])
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) / math.sqrt(fan_in))
        data = torch.randn(10, 3, 227, 227, generator=gen) * 50
        cpu = net(data)["prob"]
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = net.to(device)(data.to(device))["prob"].cpu()
    return float((gpu - cpu).abs().max() / cpu.abs().max())


def speed(device: torch.device, autocast: bool, repeats: int = 20) -> tuple[float, float]:
    net, reference = build_pair(32, device)
    data = torch.randn(32, 3, 227, 227, device=device)
    label = torch.randint(0, 1000, (32,), device=device).float()
    context = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    runs = {
        "ours": lambda: step_caffe_alex(net, data, label),
        "reference": lambda: step_reference(reference, data, label),
    }
    times = {name: [] for name in runs}
    with context:
        for fn in runs.values():
            for _ in range(3):
                fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                net.zero_grad(set_to_none=True)
                reference.zero_grad(set_to_none=True)
                times[name].append(timed(fn, device))
    return statistics.median(times["ours"]), statistics.median(times["reference"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    error = parity(device)
    print(f"AlexNet deploy prob, GPU vs CPU: max relative error {error:.3g}")
    for autocast in (False, True):
        ours, ref = speed(device, autocast)
        kind = "bf16 autocast" if autocast else "fp32"
        print(
            f"AlexNet fwd+bwd batch 32 {kind}: caffe-alex {ours * 1000:.2f} ms, "
            f"hand-written {ref * 1000:.2f} ms, ratio {ours / ref:.3f}, "
            f"{32 / ours:.0f} images/s"
        )
    train_alexnet.main(["--batch", "256", "--rounds", "5", "--iters", "2", "--device", str(device)])
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"], cwd=ROOT)
    return int(error > 1e-4 or tests.returncode != 0)


if __name__ == "__main__":
    sys.exit(main())
