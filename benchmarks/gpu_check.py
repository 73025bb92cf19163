"""The checks that need a GPU, in one run: prints figures, exits non-zero if a check fails.

    python benchmarks/gpu_check.py [--device cuda:0]

1. AlexNet deploy on the GPU against the CPU (same weights, same batch): max relative error.
2. AlexNet forward+backward at batch 32 (train_val, TRAIN) on the GPU, fp32 and bf16 autocast,
   against the hand-written nn.Module of benchmarks/alexnet_cpu.py, alternating in one run.
3. AlexNet training iterations at batch 256 (benchmarks/train_alexnet.py on the GPU), fp32 and
   bf16, each in NCHW and channels_last: the Solver against a hand-written PyTorch loop with the
   same SGD update, images/s side by side.
4. Two ranks through ``caffe-alex train`` on the tiny HDF5 problem of the tests: NCCL on GPUs 0
   and 1 (``--gpu 0,1``) when there are two, else two ranks sharing GPU 0 over gloo under
   torchrun; their weights after 20 iterations against one process with iter_size 2 (Caffe's
   equivalence; reference: 1e-5 relative).
5. The test-suite's CUDA tests (``pytest -k cuda``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import train_alexnet  # noqa: E402
from benchmarks.alexnet_cpu import build, step_caffe_alex, step_reference, timed  # noqa: E402
from caffe_alex.formats.weights import read_weights  # noqa: E402
from caffe_alex.net import Net  # noqa: E402
from caffe_alex.solvers import Solver  # noqa: E402
from tests.commands.test_train import write_tiny_problem  # noqa: E402


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
    net, (reference, _) = build(32, device)
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


def _weights(path) -> list[np.ndarray]:
    return [b.data for lw in read_weights(str(path)).layers for b in lw.blobs if b is not None]


def two_ranks(gpus: int) -> float:
    """2 ranks against 1 process with iter_size 2; ``gpus`` 0 runs them on the CPU (gloo)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_tiny_problem(root, max_iter=20, snapshot=0)
        text = files["solver"].read_text()
        single = root / "single.prototxt"
        single.write_text(text.replace(f'"{files["prefix"]}"', f'"{root / "single"}"')
                          + "iter_size: 2\n")  # fmt: skip
        train = ["-m", "caffe_alex", "train", "--solver", str(files["solver"])]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2"]  # fmt: skip
        if gpus >= 2:
            how, command = "NCCL, --gpu 0,1", [sys.executable, *train, "--gpu", "0,1"]
        elif gpus == 1:
            how = "gloo, 2 ranks on GPU 0 under torchrun"
            command = [*torchrun, *train, "--gpu", "0,0", "--dist-backend", "gloo"]
        else:
            how, command = "gloo, 2 CPU ranks under torchrun", [*torchrun, *train, "--gpu", "none"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            print(f"2-rank run ({how}) failed:\n{result.stderr[-3000:]}")
            return float("inf")
        device = torch.device("cuda", 0) if gpus else torch.device("cpu")
        reference = Solver.from_file(str(single), device=device)
        reference.solve()
        reference.close()
        ours = _weights(f"{files['prefix']}_iter_20.caffemodel")
        theirs = _weights(root / "single_iter_20.caffemodel")
        error = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(ours, theirs))
    print(f"2-rank training ({how}): {seconds:.1f} s for 20 iterations; weights against 1 "
          f"process with iter_size 2: max relative difference {error:.2g} (reference 1e-5)")
    return error


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
    for precision in ("fp32", "bf16"):
        for layout in ([], ["--channels-last"]):
            train_alexnet.main(["--batch", "256", "--rounds", "5", "--iters", "2",
                                "--device", str(device), "--precision", precision, *layout])
    ranks_error = two_ranks(torch.cuda.device_count())
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT)
    return int(error > 1e-4 or ranks_error > 1e-5 or tests.returncode != 0)


if __name__ == "__main__":
    sys.exit(main())
