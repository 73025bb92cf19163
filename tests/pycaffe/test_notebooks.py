"""BVLC Caffe's own pycaffe notebooks, re-expressed on small generated data: the code paths of
01-learning-lenet (NetSpec, SGDSolver, the hand-written training loop) and net_surgery
(editing weights through .data, transplanting an InnerProduct into a Convolution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe
from caffe import layers as L
from caffe import params as P
from caffe_alex.data.datum import array_to_datum
from caffe_alex.data.db import open_db


def _digits_lmdb(path, count: int, seed: int) -> None:
    """28x28 'digits': class k is a bright bar at rows 2k..2k+3 over noise."""
    rng = np.random.default_rng(seed)
    with open_db(str(path), "lmdb", "new") as db:
        txn = db.transaction()
        for i in range(count):
            label = int(rng.integers(10))
            image = rng.integers(0, 60, (1, 28, 28), dtype=np.uint8)
            image[0, 2 * label + 4 : 2 * label + 8, 4:24] = 250
            txn.put(f"{i:08d}", array_to_datum(image, label).SerializeToString())
        txn.commit()


def lenet(lmdb, batch_size):
    # the notebook's own definition, unchanged
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)  # fmt: skip
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))  # fmt: skip
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


@pytest.mark.slow  # trains LeNet for the notebook's iterations
def test_learning_lenet_notebook(tmp_path):
    _digits_lmdb(tmp_path / "train_lmdb", 640, 0)
    _digits_lmdb(tmp_path / "test_lmdb", 200, 1)
    (tmp_path / "train.prototxt").write_text(str(lenet(str(tmp_path / "train_lmdb"), 64)))
    (tmp_path / "test.prototxt").write_text(str(lenet(str(tmp_path / "test_lmdb"), 100)))
    (tmp_path / "solver.prototxt").write_text(
        f'train_net: "{tmp_path}/train.prototxt"\ntest_net: "{tmp_path}/test.prototxt"\n'
        "test_iter: 2\ntest_interval: 500\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n"
        'lr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 100\nmax_iter: 10000\n'
        f'snapshot: 5000\nsnapshot_prefix: "{tmp_path}/lenet"\nrandom_seed: 1\n'
    )
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    # the shapes the notebook prints
    assert [(k, v.data.shape) for k, v in solver.net.blobs.items()] == [
        ("data", (64, 1, 28, 28)), ("label", (64,)), ("conv1", (64, 20, 24, 24)),
        ("pool1", (64, 20, 12, 12)), ("conv2", (64, 50, 8, 8)), ("pool2", (64, 50, 4, 4)),
        ("fc1", (64, 500)), ("score", (64, 10)), ("loss", ()),
    ]  # fmt: skip
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()] == [
        ("conv1", (20, 1, 5, 5)), ("conv2", (50, 20, 5, 5)), ("fc1", (500, 800)),
        ("score", (10, 500)),
    ]  # fmt: skip
    solver.net.forward()
    solver.test_nets[0].forward()
    assert solver.net.blobs["data"].data[:8, 0].transpose(1, 0, 2).reshape(28, 8 * 28).max() <= 1
    solver.step(1)
    assert solver.net.params["conv1"][0].diff[:, 0].reshape(4, 5, 5, 5).any()
    niter, test_interval = 40, 20
    train_loss = np.zeros(niter)
    test_acc = np.zeros(int(np.ceil(niter / test_interval)))
    output = np.zeros((niter, 8, 10))
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
        solver.test_nets[0].forward(start="conv1")
        output[it] = solver.test_nets[0].blobs["score"].data[:8]
        if it % test_interval == 0:
            correct = 0
            for _ in range(2):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs["score"].data.argmax(1)
                               == solver.test_nets[0].blobs["label"].data)  # fmt: skip
            test_acc[it // test_interval] = correct / 200
    assert solver.iter == niter + 1
    assert train_loss[-5:].mean() < 0.5 * train_loss[:5].mean()
    assert test_acc[-1] > 0.5  # chance is 0.1
    assert not np.array_equal(output[0], output[-1])


def test_net_surgery_notebook(tmp_path):
    fc = """name: "fc"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "fc6" type: "InnerProduct" bottom: "data" top: "fc6"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }"""  # noqa: E501
    conv = fc.replace('type: "InnerProduct"', 'type: "Convolution"').replace('"fc6"', '"fc6-conv"')
    conv = conv.replace("inner_product_param { num_output: 5",
                        "convolution_param { num_output: 5 kernel_size: 4")  # fmt: skip
    (tmp_path / "fc.prototxt").write_text(fc)
    (tmp_path / "conv.prototxt").write_text(conv)
    net = caffe.Net(str(tmp_path / "fc.prototxt"), caffe.TEST)
    net_full_conv = caffe.Net(str(tmp_path / "conv.prototxt"), caffe.TEST)
    # the notebook's transplant: the same numbers, another shape
    for pr, pr_conv in (("fc6", "fc6-conv"),):
        net_full_conv.params[pr_conv][0].data.flat = net.params[pr][0].data.flat
        net_full_conv.params[pr_conv][1].data[...] = net.params[pr][1].data
    net_full_conv.save(str(tmp_path / "full_conv.caffemodel"))
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    fc_out = net.forward(data=x)["fc6"]
    reloaded = caffe.Net(str(tmp_path / "conv.prototxt"), caffe.TEST,
                         weights=str(tmp_path / "full_conv.caffemodel"))  # fmt: skip
    conv_out = reloaded.forward(data=x)["fc6-conv"]
    np.testing.assert_allclose(conv_out.reshape(2, 5), fc_out, rtol=1e-5, atol=1e-6)
    # editing a filter by hand, as the notebook does with its Gaussian blur
    reloaded.params["fc6-conv"][0].data[...] = 0
    reloaded.params["fc6-conv"][0].data[0, 0, 1, 1] = 1.0
    reloaded.params["fc6-conv"][1].data[...] = 0
    out = reloaded.forward(data=x)["fc6-conv"]
    assert out[:, 0, 0, 0] == pytest.approx(x[:, 0, 1, 1])


DREAM_NET = """name: "dream" force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""  # noqa: E501


def test_deepdream_step_and_saliency_read_the_input_gradient(tmp_path):
    """google/deepdream's make_step (objective L2: dst.diff = dst.data, backward(start=end))
    and a saliency map (a one-hot diff on prob, backward()): the gradient at the input equals
    autograd of the same net as one graph to 1e-5."""
    (tmp_path / "dream.prototxt").write_text(DREAM_NET)
    net = caffe.Net(str(tmp_path / "dream.prototxt"), caffe.TEST)
    x = np.random.default_rng(3).normal(size=(1, 3, 12, 12)).astype(np.float32)
    src = net.blobs["data"]
    src.data[0] = x[0]
    end = "conv2"
    net.forward(end=end)
    dst = net.blobs[end]
    dst.diff[:] = dst.data  # objective_L2
    net.backward(start=end)
    g = src.diff[0].copy()
    xt = torch.from_numpy(x).requires_grad_()
    module = net.module  # the same weights, as one autograd graph
    module(data=xt)
    (0.5 * (module.blobs[end] ** 2).sum()).backward()
    np.testing.assert_allclose(g, xt.grad[0].numpy(), rtol=1e-5, atol=1e-6 * abs(g).max())
    src.data[:] += 1.5 / np.abs(g).mean() * g  # the notebook's ascent step, then again
    net.forward(end=end)
    dst.diff[:] = dst.data
    net.backward(start=end)
    assert not np.allclose(src.diff[0], g)
    # saliency: d prob[c] / d data, from a diff written on prob by hand
    net.forward(data=x)
    c = int(net.blobs["prob"].data[0].argmax())
    net.blobs["prob"].diff[...] = 0
    net.blobs["prob"].diff[0, c] = 1
    saliency = net.backward()["data"][0]
    xt = torch.from_numpy(x).requires_grad_()
    module(data=xt)["prob"][0, c].backward()
    np.testing.assert_allclose(saliency, xt.grad[0].numpy(), rtol=1e-5,
                               atol=1e-6 * abs(saliency).max())  # fmt: skip
