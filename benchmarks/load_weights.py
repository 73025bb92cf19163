"""Time loading an AlexNet-size .caffemodel (~233 MB, 61M parameters) into the deploy net.

Each measurement runs in a fresh subprocess, and peak memory is its ru_maxrss: a baseline
process only builds the net; the load process builds it and then loads the file. The
difference is the extra memory loading needed (file pages mapped and touched count in it).
Also timed for comparison: parsing the same file with the generated protobuf classes.

    python benchmarks/load_weights.py [--folder /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "models", "bvlc_alexnet", "deploy.prototxt")

CHILD = r"""
import json, resource, sys, time
from caffe_alex.net import Net
mode, path, deploy = sys.argv[1:4]
net = Net.from_prototxt(deploy)
start = time.perf_counter()
if mode == "load":
    net.load_weights(path)
elif mode == "protobuf":
    from caffe_alex.proto import caffe_pb2
    with open(path, "rb") as f:
        caffe_pb2.NetParameter.FromString(f.read())
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(mode: str, path: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, path, DEPLOY],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="where to write the file (default: tmp)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from caffe_alex.net import Net

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        path = os.path.join(tmp, "alexnet.caffemodel")
        Net.from_prototxt(DEPLOY).save_weights(path)
        size = os.path.getsize(path)
        base = min((run("baseline", path) for _ in range(args.repeat)), key=lambda r: r["maxrss"])
        load = min((run("load", path) for _ in range(args.repeat)), key=lambda r: r["seconds"])
        proto = run("protobuf", path)
    mb = 1 << 20
    extra = load["maxrss"] - base["maxrss"]
    print(f"file: {size / mb:.1f} MiB ({size:,} bytes)")
    print(
        f"load_weights: {load['seconds']:.3f} s, peak extra memory {extra / mb:.1f} MiB "
        f"({extra / size:.2f}x the file; baseline process {base['maxrss'] / mb:.0f} MiB)"
    )
    pextra = proto["maxrss"] - base["maxrss"]
    print(
        f"for comparison, NetParameter.FromString alone: {proto['seconds']:.3f} s, "
        f"peak extra {pextra / mb:.1f} MiB ({pextra / size:.2f}x)"
    )


if __name__ == "__main__":
    main()
