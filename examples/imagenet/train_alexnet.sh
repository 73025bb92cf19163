#!/usr/bin/env bash
# Train AlexNet on the LMDBs create_imagenet.sh built, with BVLC's reference solver
# (models/bvlc_alexnet/solver.prototxt), as Caffe's examples/imagenet/train_caffenet.sh does.
#
#   bash examples/imagenet/train_alexnet.sh                # from scratch
#   bash examples/imagenet/train_alexnet.sh --snapshot \
#       models/bvlc_alexnet/caffe_alexnet_train_iter_10000.solverstate   # resume
#
# Extra arguments go to `caffe-alex train` (e.g. --gpu 0, --log train.log). WORKDIR (default:
# the repository root) is where the LMDBs and the mean are, as for create_imagenet.sh.
set -euo pipefail
WORKDIR=${WORKDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
CAFFE_ALEX=${CAFFE_ALEX:-caffe-alex}
cd "$WORKDIR"
exec $CAFFE_ALEX train --solver models/bvlc_alexnet/solver.prototxt "$@"
