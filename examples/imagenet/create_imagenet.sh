#!/usr/bin/env bash
# Build the inputs of models/bvlc_alexnet/train_val.prototxt from ILSVRC2012, as Caffe's own
# examples/imagenet/create_imagenet.sh and make_imagenet_mean.sh do, with caffe-alex's tools:
#   examples/imagenet/ilsvrc12_train_lmdb   training images, 256x256, shuffled
#   examples/imagenet/ilsvrc12_val_lmdb     validation images, 256x256, shuffled
#   data/ilsvrc12/imagenet_mean.binaryproto the mean image of the training LMDB
#
#   TRAIN_DATA_ROOT=/data/ILSVRC2012/train/ VAL_DATA_ROOT=/data/ILSVRC2012/val/ \
#   LABELS=/data/ilsvrc12 bash examples/imagenet/create_imagenet.sh
#
# TRAIN_DATA_ROOT / VAL_DATA_ROOT: folders the list files' paths are relative to (with a
# trailing /). LABELS: the folder holding Caffe's train.txt and val.txt ('<path> <label>' lines,
# e.g. "n01440764/n01440764_10026.JPEG 0", from Caffe's data/ilsvrc12/get_ilsvrc_aux.sh).
# WORKDIR (default: the repository root): where the outputs go, the folder to train from.
# Existing outputs are refused, as Caffe's tools refuse them: remove them to rebuild.
# See docs/imagenet.md for the whole recipe and its timings.
set -euo pipefail

: "${TRAIN_DATA_ROOT:?set TRAIN_DATA_ROOT to the ILSVRC2012 training images folder (ending in /)}"
: "${VAL_DATA_ROOT:?set VAL_DATA_ROOT to the ILSVRC2012 validation images folder (ending in /)}"
: "${LABELS:?set LABELS to the folder holding train.txt and val.txt}"
WORKDIR=${WORKDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
RESIZE=${RESIZE:-256}
CAFFE_ALEX=${CAFFE_ALEX:-caffe-alex}

for f in "$TRAIN_DATA_ROOT" "$VAL_DATA_ROOT"; do
    [ -d "$f" ] || { echo "create_imagenet.sh: no such folder: $f" >&2; exit 1; }
done
for f in "$LABELS/train.txt" "$LABELS/val.txt"; do
    [ -f "$f" ] || { echo "create_imagenet.sh: no such file: $f" >&2; exit 1; }
done

cd "$WORKDIR"
mkdir -p examples/imagenet data/ilsvrc12

echo "Creating train lmdb..."
$CAFFE_ALEX convert-imageset --resize_height "$RESIZE" --resize_width "$RESIZE" --shuffle \
    "$TRAIN_DATA_ROOT" "$LABELS/train.txt" examples/imagenet/ilsvrc12_train_lmdb

echo "Creating val lmdb..."
$CAFFE_ALEX convert-imageset --resize_height "$RESIZE" --resize_width "$RESIZE" --shuffle \
    "$VAL_DATA_ROOT" "$LABELS/val.txt" examples/imagenet/ilsvrc12_val_lmdb

echo "Computing the mean image..."
$CAFFE_ALEX compute-image-mean examples/imagenet/ilsvrc12_train_lmdb \
    data/ilsvrc12/imagenet_mean.binaryproto

echo "Done. Train with: bash examples/imagenet/train_alexnet.sh"
