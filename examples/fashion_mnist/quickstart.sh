#!/usr/bin/env bash
# From a fresh checkout to a trained net on Fashion-MNIST, in one command:
#
#   bash examples/fashion_mnist/quickstart.sh            # AlexNet, 227x227 (about 7 CPU minutes)
#   bash examples/fashion_mnist/quickstart.sh lenet      # Caffe's LeNet example, 10,000 iterations
#
# It installs what is missing (a virtual environment with torch and the project, Graphviz and the
# dataset-fashion-mnist package through apt-get), converts the data with caffe-alex's data tools,
# trains from the solver file with `caffe-alex train`, scores the snapshot with `caffe-alex test`
# and draws the training curves with `caffe-alex plot-log`. Steps whose output exists are skipped.
# FASHION_MNIST_DIR points at the four .gz files if they are somewhere else.
set -euo pipefail
cd "$(dirname "$0")/../.."
EX=examples/fashion_mnist
MODEL=${1:-alexnet}
START=$SECONDS
step() { printf '\n== [%3ds] %s\n' $((SECONDS - START)) "$*"; }

case "$MODEL" in
    alexnet | lenet) ;;
    *) echo "usage: $0 [alexnet|lenet]" >&2; exit 2 ;;
esac

# -- 1. what is missing: Graphviz and the dataset (apt-get), a Python environment (pip) ------
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
DATA=$FASHION_MNIST_DIR
setup_system_packages
setup_python
caffe-alex --version

# -- 3. data: Fashion-MNIST as LMDBs, with the data tools ---------------------------------------
convert() {  # convert SET(train|t10k) DB [flags...]
    local set=$1 db=$2
    shift 2
    if [ ! -f "$db/data.mdb" ]; then
        step "convert-mnist $set -> $db $*"
        caffe-alex convert-mnist "$@" "$DATA/$set-images-idx3-ubyte.gz" \
            "$DATA/$set-labels-idx1-ubyte.gz" "$db"
    fi
}
if [ "$MODEL" = alexnet ]; then
    # 227x227 gray images; a subset keeps the run to minutes on a CPU
    convert train $EX/fashion_train_227_lmdb --resize 227 --limit 8000
    convert t10k $EX/fashion_test_227_lmdb --resize 227 --limit 1000
    MEAN=$EX/fashion_train_227_mean.binaryproto
    if [ ! -f "$MEAN" ]; then
        step "compute-image-mean -> $MEAN"
        caffe-alex compute-image-mean $EX/fashion_train_227_lmdb "$MEAN"
    fi
    TEST_ITERATIONS=20 # x 50 = the 1,000 test images
    ITERS=240
else
    convert train $EX/fashion_train_lmdb
    convert t10k $EX/fashion_test_lmdb
    TEST_ITERATIONS=100 # x 100 = the 10,000 test images
    ITERS=10000
fi
NET=$EX/${MODEL}_train_test.prototxt
if command -v dot >/dev/null; then
    step "draw $NET -> $EX/$MODEL.png"
    caffe-alex draw --phase train "$NET" "$EX/$MODEL.png"
fi

# -- 4. train, score, plot ----------------------------------------------------------------------
step "caffe-alex train --solver $EX/${MODEL}_solver.prototxt (log: $EX/${MODEL}_train.log)"
T0=$SECONDS
caffe-alex train --solver "$EX/${MODEL}_solver.prototxt" --log "$EX/${MODEL}_train.log"
TRAIN_SECONDS=$((SECONDS - T0))
WEIGHTS=$EX/${MODEL}_iter_${ITERS}.caffemodel

step "caffe-alex test --model $NET --weights $WEIGHTS --iterations $TEST_ITERATIONS"
caffe-alex test --model "$NET" --weights "$WEIGHTS" --iterations $TEST_ITERATIONS \
    2>&1 | grep -v "] Batch " | tee "$EX/${MODEL}_test.log"

step "caffe-alex plot-log -> $EX/${MODEL}_curves.png"
caffe-alex plot-log "$EX/${MODEL}_train.log" "$EX/${MODEL}_curves.png"

ACCURACY=$(sed -n 's/.*] accuracy = \([0-9.e+-]*\).*/\1/p' "$EX/${MODEL}_test.log" | tail -1)
FIRST=$(sed -n 's/.*Iteration 0 (.*), loss = \(.*\)/\1/p' "$EX/${MODEL}_train.log" | head -1)
LAST=$(sed -n 's/.*Iteration [0-9]*, loss = \(.*\)/\1/p' "$EX/${MODEL}_train.log" | tail -1)
printf '\n%s on Fashion-MNIST: training loss %s -> %s, test accuracy %s (chance: 0.1)\n' \
    "$MODEL" "${FIRST:-?}" "${LAST:-?}" "${ACCURACY:-?}"
printf 'training took %ds, everything %ds\n' "$TRAIN_SECONDS" $((SECONDS - START))
printf 'snapshot: %s (+ .solverstate)\ncurves:   %s\n' "$WEIGHTS" "$EX/${MODEL}_curves.png"
