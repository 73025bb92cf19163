#!/usr/bin/env bash
# Regenerate caffe_alex/proto/caffe_pb2.py from proto/caffe.proto.
# Needs grpcio-tools (pip install grpcio-tools), which bundles protoc; tests/test_proto.py checks
# that the committed module matches what this script produces.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
"$python" -m grpc_tools.protoc \
    --proto_path="$root/proto" \
    --python_out="$root/caffe_alex/proto" \
    "$root/proto/caffe.proto"
echo "wrote $root/caffe_alex/proto/caffe_pb2.py"
