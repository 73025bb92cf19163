"""BVLC's brewing-logreg notebook (examples/02-brewing-logreg.ipynb) as a plain pycaffe script,
for benchmarks/vs_caffe.py to time under real pycaffe and under caffe-alex's ``caffe``.

What it does is what the notebook does: 10,000 rows of 4 features in two classes (drawn here
with NumPy, seeded, instead of scikit-learn's make_classification, so both interpreters need
only NumPy and h5py) written as HDF5 train/test files; a logistic regression (InnerProduct to
2 classes) and then a net with one hidden layer of 40 ReLUs, each defined with NetSpec and
trained by ``solver.solve()`` for 10,000 SGD iterations (the notebook's solver: base_lr 0.01,
step policy, momentum 0.9, weight decay 5e-4, a test pass of 250 batches every 1,000); the
test accuracy of each printed.

    python benchmarks/scripts/brewing_logreg.py FOLDER [ITERATIONS]

(ITERATIONS, default the notebook's 10,000, shortens both solves for a quick check.)
"""

import os
import sys

import h5py
import numpy as np

import caffe
from caffe import layers as L

SOLVER = """train_net: "{train}"
test_net: "{test}"
test_iter: 250
test_interval: 1000
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 5000
display: 1000
max_iter: 10000
momentum: 0.9
weight_decay: 0.0005
snapshot: 10000
snapshot_prefix: "{prefix}"
solver_mode: CPU
"""


def write_data(folder):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(10000, 4)).astype(np.float32)
    y = (x.dot([1.0, -2.0, 0.5, 0.0]) + 0.5 * rng.normal(size=10000) > 0).astype(np.float32)
    lists = []
    for name, rows in (("train", slice(0, 7500)), ("test", slice(7500, 10000))):
        path = os.path.join(folder, name + ".h5")
        with h5py.File(path, "w") as f:
            f["data"], f["label"] = x[rows], y[rows]
        listing = os.path.join(folder, name + ".txt")
        with open(listing, "w") as f:
            f.write(path + "\n")
        lists.append(listing)
    return lists


def logreg(hdf5, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip1, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
    return n.to_proto()


def nonlinear(hdf5, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip2, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def train(folder, name, make, train_list, test_list, iterations=10000):
    paths = {}
    for part, listing in (("train", train_list), ("test", test_list)):
        paths[part] = os.path.join(folder, f"{name}_{part}.prototxt")
        with open(paths[part], "w") as f:
            f.write(str(make(listing, 10)))
    solver_path = os.path.join(folder, name + "_solver.prototxt")
    with open(solver_path, "w") as f:
        text = SOLVER.format(prefix=os.path.join(folder, name), **paths)
        f.write(text.replace("max_iter: 10000", f"max_iter: {iterations}"))
    solver = caffe.get_solver(solver_path)
    solver.solve()
    accuracy = 0
    for _ in range(250):
        solver.test_nets[0].forward()
        accuracy += solver.test_nets[0].blobs["accuracy"].data
    return accuracy / 250


def main(folder, iterations=10000):
    caffe.set_mode_cpu()
    train_list, test_list = write_data(folder)
    for name, make in (("logreg", logreg), ("nonlinear", nonlinear)):
        accuracy = train(folder, name, make, train_list, test_list, iterations)
        print(f"{name} accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(n) for n in sys.argv[2:3]))
